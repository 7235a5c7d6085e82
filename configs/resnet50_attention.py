r"""The ResNet-50 recipe with an attention-pooling head instead of global average pooling: the
same weights, grouped folds, optimisation and evaluation as `configs/resnet50.py` (this file
builds on it and changes one field, `model.head`).

Command (one test fold), torchvision's weights converted once as for `resnet50.py`:

    python main.py --config=configs/resnet50_attention.py:fold=2 \
        --workdir=workdirs/r50_attention_fold2 --config.init_from=weights/tv_r50

(the same as `configs/resnet50.py --config.model.head=attention`). All five folds:
`configs/resnet50_attention.py:fold=all`.

The head (`sipak_jax.models.heads.AttentionPool`): a small MLP scores each of layer4's 7 x 7
positions, a softmax over the positions gives weights summing to 1, and the pooled feature is
the weighted sum (attention-based pooling, Ilse et al. 2018). It starts as global average
pooling (the score layer is zero-initialised) and is trained with the new `fc` as the head
(the head learning rate, `head_epochs`, not loaded by `init_from`). Its weights are the
model's own answer to where it looked: `explain --method=attention_head`,
`saliency_eval --methods=attention_head,gradcam,ig` (nucleus share, pointing game,
deletion/insertion, randomisation check beside Grad-CAM and IG).

What it reaches: NOT MEASURED on real SIPaKMeD (the data cannot be downloaded here). A 7 x 7
attention over layer4 is as coarse as Grad-CAM at layer4; whether it looks at the nucleus more
often than Grad-CAM does is what `saliency_eval` measures, not something assumed here.
"""

from configs import resnet50
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, fold="0")
    config = resnet50.get_config(f"fold={args['fold']}")
    config.model.head = "attention"
    return config
