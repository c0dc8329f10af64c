"""The PixArt releases' published settings, written down from their sources: the test reference for the pack's
schedulers, variant presets and loaders. Nothing here is imported from the pack.

Sources (each value below names one):
  [Σ-sched]  huggingface.co/PixArt-alpha/PixArt-Sigma-XL-2-1024-MS  scheduler/scheduler_config.json (commit 20658be)
  [Σ-repo]   github.com/PixArt-alpha/PixArt-sigma @ 1ce521afddcc2fab329b35b7374aa86d654e12f7
  [α-repo]   github.com/PixArt-alpha/PixArt-alpha @ cac2fd3b4544cf7620d8fbbf8b19d97ffcb85892
  [Σ-1024-tr] huggingface.co/PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (commit edfd592)
  [Σ-2K-tr]   huggingface.co/PixArt-alpha/PixArt-Sigma-XL-2-2K-MS transformer/config.json (commit cd274f4)
  [diffusers] diffusers 0.42.1 src/diffusers/models/transformers/pixart_transformer_2d.py (read in the test venv)

Not reachable from here (so not written down): the scheduler_config.json of PixArt-XL-2-1024-MS (the α repository;
655 bytes, DPMSolverMultistepScheduler per its model_index.json), PixArt-LCM-XL-2-1024-MS (530 bytes, LCMScheduler)
and PixArt-Alpha-DMD-XL-2-512x512 (503 bytes, DDPMScheduler). Their samplers are taken from the original
repositories' own sampling code instead, cited line by line below.
"""
from __future__ import annotations

import math

# [Σ-sched], every field as published ("lambda_min_clipped": -Infinity in the JSON).
SIGMA_SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -math.inf,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

# The release's training schedule and timestep spacing, as [Σ-sched] states them: what diffusers'
# `OtherScheduler.from_config(pipe.scheduler.config)` (its documented way to switch a pipeline's sampler)
# carries into any other scheduler.
RELEASE_SCHEDULE = {k: SIGMA_SCHEDULER_CONFIG[k] for k in (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "timestep_spacing", "steps_offset")}
TRAINING_SCHEDULE = {k: RELEASE_SCHEDULE[k] for k in (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")}

# The pack's scheduler id -> (diffusers class, its settings); settings not named keep diffusers' own defaults.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    # [Σ-sched]: the whole file.
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {k: v for k, v in SIGMA_SCHEDULER_CONFIG.items() if k[0] != "_"}),
    # [α-repo] app/app.py:174: SASolverScheduler.from_config(pipe.scheduler.config, algorithm_type='data_prediction',
    # tau_func=lambda t: 1 if 200 <= t <= 800 else 0, predictor_order=2, corrector_order=2) (the tau_func given
    # there is diffusers' default, so it is not a config field).
    "sa_solver": ("SASolverScheduler", {**{k: v for k, v in SIGMA_SCHEDULER_CONFIG.items() if k[0] != "_"},
                                        "algorithm_type": "data_prediction", "predictor_order": 2,
                                        "corrector_order": 2}),
    # No PixArt source uses DDIM: the release schedule and spacing; the predicted x0 is never clipped
    # ([Σ-repo] scripts/inference.py:98 samples with clip_denoised=False).
    "ddim": ("DDIMScheduler", {**RELEASE_SCHEDULE, "clip_sample": False}),
    # No PixArt source uses Euler / Euler ancestral / UniPC: the release schedule and spacing.
    "euler": ("EulerDiscreteScheduler", dict(RELEASE_SCHEDULE)),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", dict(RELEASE_SCHEDULE)),
    "unipc": ("UniPCMultistepScheduler", dict(RELEASE_SCHEDULE)),
    # [Σ-repo] scripts/inference.py:95-98: IDDPM ancestral sampling, clip_denoised=False; its respacing
    # (diffusion/model/respace.py:54-58, round(i * 999 / (n - 1))) is diffusers' "linspace" spacing.
    "ddpm": ("DDPMScheduler", {**RELEASE_SCHEDULE, "clip_sample": False}),
    # [α-repo] scripts/inference_lcm.py:117: LCMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    # prediction_type="epsilon"); everything else the (diffusers-identical) class's defaults.
    "lcm": ("LCMScheduler", dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")),
    # [Σ-repo] app/app_pixart_dmd.py:132,193-194: DDPMScheduler, timesteps=[400], guidance_scale=1; the one step
    # returns the unclipped x0 estimate ([Σ-repo] scripts/DMD/transformer_train/generate.py:34-41, eps_to_mu).
    "dmd": ("DDPMScheduler", {**TRAINING_SCHEDULE, "clip_sample": False}),
}
DMD_TIMESTEPS = [400]  # [Σ-repo] app/app_pixart_dmd.py:193
DMD_GUIDANCE = 1.0  # [Σ-repo] app/app_pixart_dmd.py:194


def scheduler(name: str):
    """A fresh diffusers scheduler built from the published settings above (never from the pack)."""
    import diffusers

    cls, settings = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(settings)


# Per variant: latent sample_size (image_size // 8), position-embedding interpolation (pe_interpolation /
# lewei_scale / diffusers' interpolation_scale), T5 token limit, micro-conditioning, VAE scaling factor.
VARIANTS: dict[str, dict] = {
    # [Σ-repo] configs/pixart_sigma_config/PixArt_sigma_xl2_img256_internal.py: image_size 256 (l.9),
    # pe_interpolation 0.5 (l.19), scale_factor 0.13025 (l.38), model_max_length 300 (l.40); micro_condition False
    # inherited from configs/PixArt_xl2_internal.py:78.
    "sigma-256": dict(sample_size=32, interpolation_scale=0.5, max_tokens=300, micro_conditioning=False,
                      vae_scaling_factor=0.13025),
    # [Σ-repo] configs/pixart_sigma_config/PixArt_sigma_xl2_img512_internalms.py: l.9, l.20 (1.0), l.40, l.42.
    "sigma-512": dict(sample_size=64, interpolation_scale=1.0, max_tokens=300, micro_conditioning=False,
                      vae_scaling_factor=0.13025),
    # [Σ-repo] configs/pixart_sigma_config/PixArt_sigma_xl2_img1024_internalms.py: l.9, l.20 (2.0), l.40, l.42;
    # [Σ-1024-tr]: "interpolation_scale": 2, "sample_size": 128.
    "sigma-1024": dict(sample_size=128, interpolation_scale=2.0, max_tokens=300, micro_conditioning=False,
                       vae_scaling_factor=0.13025),
    # [Σ-repo] configs/pixart_sigma_config/PixArt_sigma_xl2_img2K_internalms_kvcompress.py: l.9, l.20 (4.0), l.40,
    # l.42; [Σ-2K-tr]: "interpolation_scale": 4, "sample_size": 256.
    "sigma-2k": dict(sample_size=256, interpolation_scale=4.0, max_tokens=300, micro_conditioning=False,
                     vae_scaling_factor=0.13025),
    # [α-repo] configs/pixart_config/PixArt_xl2_img256_internal.py: image_size 256 (l.6), no lewei_scale of its own,
    # so configs/PixArt_xl2_internal.py's lewei_scale = 1.0 (l.13), model_max_length = 120 (l.18),
    # scale_factor = 0.18215 (l.39). [Σ-repo] tools/convert_pixart_to_diffusers.py:19 agrees
    # (interpolation_scale_alpha = {256: 1, ...}), and so does diffusers for the α converter's config, which names no
    # interpolation_scale ([α-repo] tools/convert_pixart_alpha_to_diffusers.py:135-155; [diffusers] l.138-142:
    # max(32 // 64, 1) = 1). ([Σ-repo] scripts/inference.py:157 computes image_size / 512 = 0.5 for any version; the
    # α release's own configs say 1.)
    "alpha-256": dict(sample_size=32, interpolation_scale=1.0, max_tokens=120, micro_conditioning=False,
                      vae_scaling_factor=0.18215),
    # [α-repo] configs/pixart_config/PixArt_xl2_img512_internalms.py: lewei_scale = 1.0 (l.18); base config l.18, l.39.
    "alpha-512": dict(sample_size=64, interpolation_scale=1.0, max_tokens=120, micro_conditioning=False,
                      vae_scaling_factor=0.18215),
    # [α-repo] configs/pixart_config/PixArt_xl2_img1024_internalms.py: lewei_scale = 2.0 (l.18); micro-conditioning
    # only for 1024 multi-scale ([α-repo] tools/convert_pixart_alpha_to_diffusers.py:40; [Σ-repo]
    # scripts/inference.py:158: micro_condition = version == 'alpha' and image_size == 1024).
    "alpha-1024": dict(sample_size=128, interpolation_scale=2.0, max_tokens=120, micro_conditioning=True,
                       vae_scaling_factor=0.18215),
}
# [Σ-repo] scripts/inference.py:156: max_sequence_length = {"alpha": 120, "sigma": 300}.
MAX_TOKENS = {"alpha": 120, "sigma": 300}
# [Σ-repo] configs/PixArt_xl2_internal.py:58: scale_factor = 0.18215  # ldm vae: 0.18215; sdxl vae: 0.13025
VAE_SCALING = {"sd": 0.18215, "sdxl": 0.13025}


# T5-v1.1-XXL, the text encoder of every PixArt release: the encoder settings of its config.json as exported with the
# releases' diffusers-era tooling (huggingface.co/THUDM/CogVideoX-2b text_encoder/config.json, "_name_or_path":
# "google/t5-v1_1-xxl"; the same values in huggingface.co/lintang/t5-v1_1-xxl-sglue config.json).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-06, tie_word_embeddings=False)
