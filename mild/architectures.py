"""Published UNet and VAE configurations of the architectures MILD runs on.

For building models with random weights (profiling, architecture tests): speed and
shapes depend on these, not on the weights.
"""

# Stable Diffusion 1.5 inpainting (9 input channels; heads of dim 40/80/160).
SD15_INPAINT_UNET = dict(sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
                         block_out_channels=(320, 640, 1280, 1280),
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                         cross_attention_dim=768, attention_head_dim=8)
# SDXL inpainting (heads of dim 64, text_time added conditioning, deep transformer stacks).
SDXL_INPAINT_UNET = dict(sample_size=128, in_channels=9, out_channels=4, layers_per_block=2,
                         block_out_channels=(320, 640, 1280),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                         cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# The SD / SDXL VAE (scale factor 8).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)
# FLUX.1 Fill [dev]: 19 dual- and 38 single-stream blocks, 24 heads of 128; 384 input channels
# (packed latents 64 + packed masked-image latents 64 + the 8 x 8 mask 256), guidance embedding.
FLUX_FILL_TRANSFORMER = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# SD3 Medium: 24 joint blocks of 24 heads of 64, 2 x 2 patches over 16 latent channels.
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
# The 16-channel VAE of FLUX.1 and SD3 (scale factor 8), with each model's latent shift and scale.
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.1159, scaling_factor=0.3611)
SD3_VAE = dict(FLUX_VAE, shift_factor=0.0609, scaling_factor=1.5305)
# Text tokens and pooled width a call feeds them: FLUX T5 512 tokens (4096 wide) and CLIP-L pooled;
# SD3 77 CLIP + 256 T5 tokens and the two CLIPs' pooled outputs side by side.
TRANSFORMER_TEXT = {"flux": ((512, 4096), 768), "sd3": ((77 + 256, 4096), 2048)}
