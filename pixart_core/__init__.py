"""Plain PyTorch + diffusers + transformers core of the PixArt nodes; never imports ComfyUI."""
