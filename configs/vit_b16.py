r"""ViT-B/16 fine-tuned from ImageNet on SIPaKMeD, on the same grouped folds and with the same
evaluation as `configs/resnet50.py` (this file builds on it and replaces the model and the
optimisation).

Command (one test fold), with the dataset built in the default place and timm's ViT-B/16
weights (`vit_base_patch16_224.augreg2_in21k_ft_in1k`, a `.safetensors` from the Hugging Face
hub) converted once:

    python -m sipak_jax.convert --source=timm --arch=vit_base_patch16_224 \
        --input=model.safetensors --output=weights/timm_vit_b16
    python main.py --config=configs/vit_b16.py:fold=2 --workdir=workdirs/vit_fold2

or torchvision's (`vit_b_16-c867db91.pth`, ImageNet-1k only) with
`--source=torchvision --arch=vit_b_16` and `--config.init_from=weights/tv_vit_b16`. All five
folds: `configs/vit_b16.py:fold=all`. ViT-S/16: `--config.model.variant=s16` with timm's
`vit_small_patch16_224` converted (`--config.init_from=weights/timm_vit_s16`). The attention
head instead of the class token: `--config.model.head=attention`.

What it reaches: NOT MEASURED. Nothing has been run on real SIPaKMeD here (the data cannot be
downloaded on our machines), and no ViT run longer than the tests' one epoch on synthetic
cells; expect the ResNet-50 recipe's range, not better, until a grouped 5-fold run says so.

The choices, following the references' fine-tuning recipes (BEiT, Bao et al. 2022; MAE, He
et al. 2022; timm's `vit_*` fine-tuning):
- the whole network from the first step (`head_epochs=0`: the references do not freeze);
- AdamW, weight decay 0.05 on weights only (not on biases, LayerNorm, the position
  embeddings nor the class token: `train_step._NO_DECAY`), peak learning rate 2.5e-4 for a
  batch of 64 (BEiT's 4e-3 at 1024, scaled linearly), 3 warm-up epochs, cosine decay;
- layer-wise learning-rate decay 0.65 (BEiT's and MAE's value for ViT-B): block i learns at
  0.65 ** (13 - i) of the head's rate, the embeddings at 0.65 ** 13;
- stochastic depth 0.1 (rising linearly over the blocks, as timm), label smoothing 0.1,
  gradient clipping at 1.0; no mixup/cutmix (cells are not scenes; not implemented);
- 224 px (the weights' size: the 14 x 14 position embeddings load as they are; at another
  `image_size` they are resampled bicubically when loaded, as the weights' library does);
- the input normalisation comes from the weights' metadata (timm augreg: [-1, 1];
  torchvision: ImageNet mean/std).
The same augmentation, validation split, model selection, calibration, shortcut controls and
report as `configs/resnet50.py`. Grad-CAM overlays are taken on the token grid at the input of
the last block (`ViT.features(x, 4)`); `explain --method=rollout` gives attention rollout.
"""

import ml_collections

from configs import resnet50
from configs.common import parse_arg

_SIZES = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim")


def get_config(arg=None):
    args = parse_arg(arg, fold="0")
    config = resnet50.get_config(f"fold={args['fold']}")

    config.model = ml_collections.ConfigDict()
    config.model.name = "vit"
    config.model.variant = "b16"  # 's16' or 'b16' (sipak_jax.models.vit.VARIANTS)
    # The position embeddings are made for this size: always the training image size.
    config.model.image_size = config.get_ref("image_size")
    config.model.head = "token"  # 'token' (class token, as the references) or 'attention'
    config.model.dropout_rate = 0.0
    config.model.drop_path = 0.1
    for key in _SIZES:  # set only for non-standard (tiny test) models; None = the variant's
        config.model[key] = ml_collections.config_dict.placeholder(int)
    config.init_from = "weights/timm_vit_b16"  # a converted DIR (command above)

    config.head_epochs = 0
    config.warmup_epochs = 3
    config.learning_rate = 2.5e-4
    config.weight_decay = 0.05
    config.optimizer.layer_decay = 0.65
    config.label_smoothing = 0.1
    config.grad_clip_norm = 1.0
    return config
