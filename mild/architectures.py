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
