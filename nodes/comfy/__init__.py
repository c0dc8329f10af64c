"""Every use of ComfyUI's Python internals in the pack. The node modules around this package import only ComfyUI's
versioned node API (comfy_api.v0_0_2: io, ui, ComfyExtension) and these modules:

    loading        ModelPatcher wrapping, whole and partial loads, unloading, the quantized-model OOM message,
                   room on the GPU for the T5 quantizer
    devices        device and dtype policy: "auto" dtypes, the SDPA kernel, load/offload devices, free memory
    progress       progress bar, latent previews, Cancel
    patches        weight patches: LoRA-type adapters through comfy.lora, carried over to a bridged MODEL
    native_pixart  our DiT as ComfyUI's own PixArt MODEL (the bridge)
    clip           the T5 part of a ComfyUI CLIP, driven as a transformers encoder
    paths          model folders and file lists (folder_paths)

What the pack relies on, read from ComfyUI 0.3.75. On a ComfyUI update, check every line below (the private ones
first). Under each module (first list) or class (second list): the attribute, public or private, and what the pack
uses it for. public: a name without underscore that ComfyUI's own nodes and loaders use the same way (ComfyUI
promises nothing for comfy.* outside comfy_api, but these rarely change); private: an underscore name, a method we
override, an internal call or data layout, or ComfyUI state we change ourselves. tests/nodes/test_comfy_boundary.py
fails when code outside this package imports ComfyUI, keeps the first list equal to what this package reaches in
ComfyUI's modules and the second free of attributes nothing uses, and finds every name in the ComfyUI it runs with.
Besides these, the pack sets one attribute of its own on a CLIP's text model (`_pixart_sigma_identity`,
clip.identity).

Module attributes (exactly those the code reaches):

comfy.cli_args
    args.bf16_text_enc  public   --bf16-text-enc: the T5's "auto" dtype (devices)
    args.force_fp32     public   --force-fp32: no bf16 "auto" on CPUs (devices)
    args.fp32_text_enc  public   --fp32-text-enc: the T5's "auto" dtype (devices)
    args.fp32_unet      public   --fp32-unet: no bf16 "auto" DiT on CPUs (devices)
    args.fp32_vae       public   --fp32-vae: no bf16 "auto" VAE on CPUs (devices)

comfy.latent_formats
    SD15  public   the SD latent space, for previews (PixArt-α)
    SDXL  public   the SDXL latent space, for previews (PixArt-Σ)

comfy.ldm.pixart.pixartms
    PixArtMS  public   ComfyUI's PixArt network; native_pixart.PixArtMS extends it (its constructor arguments:
                       native_pixart.unet_config)

comfy.lora
    load_lora  public   LoRA/LoHa/LoKr tensors -> weight adapters, by our key map (patches)

comfy.model_base
    BaseModel.__init__  private  called directly by BridgedPixArt, skipping PixArt.__init__, to pass its own network
                                 class
    PixArt              public   the MODEL class BridgedPixArt extends (ComfyUI's PixArt LoRA key map, extra_conds)

comfy.model_management
    current_loaded_models                      private  the loaded-model list: loading.unload unloads our model's
                                                        entries and removes them from it
    free_memory                                public   frees memory on the GPU for the T5 quantizer (loading.make_room),
                                                        as ComfyUI's loaders free it before a load
    get_free_memory                            public   free memory of a device (the VAE's tiling decision)
    get_torch_device                           public   the DiT's load device; the GPU the T5 is quantized on
    intermediate_device                        public   where node outputs live between nodes
    is_device_cpu                              public   the CPU branch of the "auto" dtypes
    load_model_gpu                             public   loads a ComfyUI CLIP's patcher, as CLIP.load_model does
    load_models_gpu                            public   loads our patchers (memory_required, force_full_load for
                                                        quantized models); a DiT with its ControlNets in one call
    should_use_bf16                            public   the T5's "auto" dtype on GPUs
    soft_empty_cache                           public   frees cached device memory before a tiled VAE retry
    text_encoder_device                        public   the T5's load device
    text_encoder_offload_device                public   the T5's offload device
    throw_exception_if_processing_interrupted  public   Cancel, after each step, tile and image
    unet_dtype                                 public   the DiT's "auto" dtype, as for ComfyUI's own PixArt
    unet_manual_cast                           public   the DiT's compute dtype where the stored one cannot compute
    unet_offload_device                        public   the DiT's offload device
    vae_device                                 public   the VAE's load device
    vae_dtype                                  public   the VAE's "auto" dtype (allowed: bf16, fp32)
    vae_offload_device                         public   the VAE's offload device
    vram_state                                 public   its name, in the warning for a quantized model left on the CPU

comfy.model_patcher
    ModelPatcher  public   the patcher around each of our models (size= our distinct bytes) and the bridged MODEL

comfy.ops
    disable_weight_init.Conv2d     public   cast-weights layer that plain Conv2d layers become (loading.castable)
    disable_weight_init.Embedding  public   the same for Embedding
    disable_weight_init.GroupNorm  public   the same for GroupNorm
    disable_weight_init.LayerNorm  public   the same for LayerNorm
    disable_weight_init.Linear     public   the same for Linear

comfy.supported_models
    PixArtAlpha                             public   the model config of a bridged PixArt-α
    PixArtSigma                             public   the model config of a bridged PixArt-Σ
    PixArtSigma.supported_inference_dtypes  public   the dtypes the DiT's "auto" dtype is chosen from

comfy.text_encoders.t5
    T5  public   ComfyUI's T5 module: how the T5 part of a CLIP is recognised

comfy.utils
    ProgressBar  public   the progress bar of sampling, tiles and VAE decodes

folder_paths
    __file__                 private  ComfyUI's folder: the T5 tokenizer it ships in comfy/text_encoders/t5_tokenizer
    filter_files_extensions  public   .gguf files of a folder (ComfyUI's lists leave them out)
    folder_names_and_paths   public   a configured pixart_t5_cache folder (extra_model_paths.yaml)
    get_filename_list        public   the loader widgets' file lists
    get_folder_paths         public   a model kind's folders (diffusers folders, .gguf search)
    get_full_path            public   a widget value -> its file
    models_dir               public   models/, for the quantized-T5 cache
    recursive_search         public   the files under a folder, for .gguf lists

latent_preview
    get_previewer  public   the previewer of --preview-method for a latent format

Attributes of ComfyUI objects (what the code reads, calls or overrides on them):

comfy.ldm.pixart.pixartms.PixArtMS
    forward_orig        private  overridden: PixArtMS.forward calls it; ours adds diffusers' position table and drops
                                 the caption mask
    patch_size          private  read by our forward_orig
    hidden_size         private  read by our forward_orig
    micro_conditioning  private  read by our forward_orig
    x_embedder          private  called by our forward_orig
    t_embedder          private  called by our forward_orig (timestep, dtype)
    csize_embedder      private  called by our forward_orig (c_size, batch)
    ar_embedder         private  called by our forward_orig (c_ar, batch)
    t_block             private  called by our forward_orig
    y_embedder          private  called by our forward_orig (y, training)
    blocks              private  each called by our forward_orig as block(x, y, t0, mask, (H, W), **kwargs)
    final_layer         private  called by our forward_orig (x, t)
    unpatchify          private  called by our forward_orig (x, H, W)

comfy.model_base.BaseModel
    diffusion_model  public   the network our weights are assigned to; its state-dict keys start "diffusion_model."
    extra_conds      public   overridden by BridgedPixArt: the conditioning encoded at its token limit

comfy.supported_models_base.BASE
    set_inference_dtype  public   the bridged MODEL computes in the DiT's dtype

comfy.model_management.LoadedModel
    model         public   the patcher of a loaded model (loading.unload)
    model_unload  private  called by loading.unload, which then removes the entry, as ComfyUI's free_memory does

comfy.model_patcher.ModelPatcher
    model           public   the module it manages: our Holder (`.model.inner` is our model) or the bridged MODEL
    load_device     public   where the model runs; inputs go there
    offload_device  public   where the model waits; a quantized model left unloaded runs there
    model_size      public   in the quantized-model OOM message
    is_clone        public   finds our model's entries among the loaded models
    clone           public   LoRA loaders patch a clone, never their input
    add_patches     private  keys: a parameter's key, or (key, (dim, start, length)[, function]) for rows of a fused
                             weight
    patches         private  read: {key: [(strength_patch, patch, strength_model, offset, function)]}, carried to the
                             MODEL
    patches_uuid    private  changes with a CLIP's patches: part of its embedding-cache identity

comfy.ops.CastWeightBiasOp
    comfy_cast_weights  private  layers that stream their weights per forward (loading._place_rest skips them)

comfy.ops.disable_weight_init.Embedding
    bias  private  None on swapped Embeddings: ComfyUI's sets it at construction and its cast path reads it

torch.nn.Module
    __class__  private  (PyTorch) castable swaps layer classes in place: ComfyUI's cast layers must add no
                        construction state but `bias`
    _apply     private  (PyTorch) _place_rest moves one module's own tensors (recurse=False); Holder and
                        BridgedPixArt override it to share the bridge's weights again after each whole move

comfy.sd.CLIP
    cond_stage_model  public   a CLIP's text model: its parts are its children (t5xxl, clip_l, ...)
    patcher           public   loads the CLIP (with its LoRA patches) and identifies its patches

comfy.sd1_clip.SDClipModel
    transformer  public   the network inside each part of a CLIP's text model

comfy.text_encoders.t5.T5
    forward               private  called as transformer(input_ids, mask, dtype=float32) -> (hidden, intermediate), as
                                   SDClipModel.forward does
    encoder               private  .block[1].layer[0].SelfAttention.relative_attention_bias: umT5 (a bias in every
                                   layer) or T5 v1.1
    shared                public   the token embedding: vocabulary size and width
    get_input_embeddings  public   its weight's device is where inputs go

comfy.utils.ProgressBar
    update_absolute  public   moves the bar, with a preview image

latent_preview.LatentPreviewer
    decode_latent_to_preview_image  public   a JPEG preview of the current x0
"""
