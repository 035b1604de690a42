"""Per-channel normalization constants, on pixels scaled to [0, 1]: ``x_norm = (x - mean) / std``."""

# ImageNet statistics: what timm/torchvision weights and the pretrained CIFAR ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# scikit-learn digits: all 1,797 images' 8x8 pixels (values 0..16 divided by 16). Upsampling keeps the mean and
# lowers the std a little (0.319 at 16x16, bilinear), which training absorbs.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)
