r"""ResNet-50 fine-tuned from ImageNet on SIPaKMeD, leak-free grouped folds: the main recipe.

Command (one test fold; fold 0 unless told), with the dataset built in the default place and
torchvision's weights converted once:

    python -m tfds_sipakmed.build --manual_dir=~/sipakmed
    python -m sipak_jax.convert --source=torchvision --download --input=resnet50-11ad3fa6.pth \
        --output=weights/tv_r50
    python main.py --config=configs/resnet50.py:fold=2 --workdir=workdirs/r50_fold2 \
        --config.init_from=weights/tv_r50

All five folds in turn, then their mean and standard deviation:

    python main.py --config=configs/resnet50.py:fold=all --workdir=workdirs/r50_cv

What it does, as a careful practitioner would:
- torchvision's ImageNet ResNet-50 (v1.5) weights through `config.init_from`: a converted DIR
  (`python -m sipak_jax.convert ...`), or the official file by name (`resnet50-11ad3fa6.pth`,
  torchvision; `resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`, Keras, with
  `model.variant='v1'`); the normalisation follows the weights' own metadata;
- 224x224 crops, padded to square with their background (`resize='pad'`), cached as uint8;
- augmentation inside the jitted step: rot90, flips, a free rotation (cells have no
  orientation);
- AdamW, softmax cross-entropy with label smoothing 0.1, global-norm clipping at 1.0;
- `head_epochs` epochs training only the new 5-class head (backbone frozen, BatchNorm
  statistics untouched), then the whole network with linear warm-up and cosine decay;
- model selection (best validation macro-F1) on a validation split carved from the four
  training folds, grouped by cluster image; the test fold is read once, at the end, by the
  best checkpoint;
- bfloat16 computation with float32 parameters, optimizer state and BatchNorm statistics.

Expected result (real SIPaKMeD, grouped 5-fold, H200 or similar): not yet measured here; no
published 5-class result uses a grouped protocol. Published fine-tuned ResNet-50 on random
cell-level splits reaches about 94-97% accuracy; expect a grouped result a few points lower.
A run of one fold takes minutes on one GPU and about a day on 2 CPU cores.

Config arguments (`configs/resnet50.py:key=value,...`): `fold` (0-4 or `all`). The CPU demo
is `configs/demo.py`, which builds on this file.

Where the data and weights come from: `data_dir=''` reads the TFDS dataset built in
`$TFDS_DATA_DIR` or `~/tensorflow_datasets` (`python -m tfds_sipakmed.build --manual_dir=M`);
`init_from` names the official torchvision file, read from the path given, or from the weights
cache (`python -m sipak_jax.convert --source=torchvision --download --input=NAME --output=DIR`
fills it). Either missing: the run stops before creating anything and says which command fixes
it.

Other datasets (`dataset`, one of `tfds_sipakmed.datasets.NAMES`): `herlev`, `cric`, or any
lab's folder of class folders, e.g.

    python main.py --config=configs/resnet50.py --config.dataset=cell_folder \
        --config.manual_dir=ROOT --config.group_regex='^(slide\d+)_' \
        --config.taxonomy=ROOT_taxonomy.json --workdir=workdirs/lab

`group_regex` (searched in the file name without extension; group 1, or the whole match, is
the group id) or `group_csv` (columns file,group) keep each slide in one fold; without either
every file is its own group and the run warns, in the console and in `results.json`, that the
protocol is not leak-free. `taxonomy` (JSON with at least `abnormal`; optionally
`class_names`, `views`, `readings`) gives the classes their clinical meaning; without it the
report uses the folder names and says that no clinical reading is defined. The classes,
taxonomy and grouping travel with the build (its `metadata.json`) into the model's metadata.

What is evaluated at the end (`evaluators`, in this order whatever the order given):
`calibration` (temperature scaling fitted on validation, ECE and Brier before/after on test),
`test` (the best checkpoint, once, on the test fold: metrics and per-example predictions),
`shortcuts` (size-only and colour-only classifiers on the same folds), `artifacts` (saliency
overlays of selected test cells for the report, `sipak_jax.run_artifacts`), `report`
(`report.html`). `calibration`, `artifacts` and `report` need `test`.

A finished workdir is not evaluated again (`reevaluate=True` asks for it: a new
`results.reeval<k>.json` beside `results.json`); a changed config is refused, except for the
safe fields of `sipak_jax.workdir` and, with `allow_more_epochs=True`, a larger `num_epochs`.
"""

import ml_collections

from configs.common import parse_arg

EVALUATORS = ("calibration", "test", "shortcuts", "artifacts", "report")


def get_config(arg=None):
    args = parse_arg(arg, fold="0")
    config = ml_collections.ConfigDict()
    config.seed = 0
    _data(config, args)
    _model(config)
    _optimisation(config)
    _bookkeeping(config)
    _workdir(config)
    return config


def _data(config, args):
    """Which data, which folds, what the model sees."""
    config.dataset = "sipakmed"  # 'sipakmed', 'herlev', 'cric', 'cell_folder' (datasets.NAMES)
    config.dataset_config = "grouped"  # leak-free folds; 'random_cells' only for comparison
    config.data_dir = ""  # TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.manual_dir = ""  # the dataset as downloaded (cell_folder: ROOT/<class>/<images>)
    config.use_tfds = True  # False: read the raw tree directly (no TensorFlow/TFDS needed)
    config.group_regex = ""  # cell_folder: regex on the file name; its group 1 = the group id
    config.group_csv = ""  # cell_folder: CSV with columns file,group (instead of the regex)
    config.taxonomy = ""  # cell_folder: taxonomy JSON (abnormal, views, readings); '' = bare
    config.crop_size = 0  # cric: side of the square crop around each nucleus; 0 = its default
    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.cells_per_class = 0  # > 0: write a synthetic SIPaKMeD and build it
    config.synthetic.seed = 0
    config.fold = args["fold"]  # the test fold: '0'..'4', or 'all' (five runs + summary)
    config.val_fraction = 0.2  # of the training folds' cluster images, for model selection
    config.image_size = 224
    config.resize = "pad"  # 'pad' (square, background colour) or 'stretch'
    config.augment = ("rot90", "flip", "rotate(180)")


def _model(config):
    """The network and its weights."""
    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet"  # 'resnet', 'convnext', 'vit' (sipak_jax.models.registry)
    config.model.depth = 50
    config.model.variant = "v1.5"
    config.model.width = 64
    config.model.dropout_rate = 0.0
    config.model.stage_sizes = ml_collections.config_dict.placeholder(tuple)
    config.model.drop_path = 0.0  # stochastic depth (ConvNeXt, ViT); ResNet has none: keep 0
    # 'gap' (global average pooling) or 'attention' (a learned attention pooling whose map
    # comes with each prediction: sipak_jax.models.heads; configs/resnet50_attention.py)
    config.model.head = "gap"
    config.init_from = "resnet50-11ad3fa6.pth"  # converted DIR or official file; '' = scratch
    config.compute_dtype = "bfloat16"  # 'float32' on CPUs (bf16 is slower there)


def _optimisation(config):
    """The optimizer and its schedule."""
    config.batch_size = 64  # global, over all devices of all hosts
    config.eval_batch_size = 128
    config.num_epochs = 30
    config.head_epochs = 3  # head-only epochs before the full fine-tune
    config.warmup_epochs = 2  # of the full fine-tune
    config.learning_rate = 3e-4  # peak, full fine-tune
    config.head_learning_rate = 1e-3  # head-only phase
    config.end_learning_rate_factor = 0.01  # cosine decays to lr * this
    config.weight_decay = 0.05  # decoupled (AdamW); not on biases or BatchNorm
    config.optimizer = ml_collections.ConfigDict()
    # Layer-wise learning-rate decay: the update of layer group i (model.layer_id: 0 the stem,
    # the head last) is scaled by layer_decay ** (num_layer_ids - 1 - i); 1.0 = off.
    config.optimizer.layer_decay = 1.0
    config.label_smoothing = 0.1
    config.grad_clip_norm = 1.0  # 0 disables
    config.max_nonfinite_steps = 5  # stop after this many non-finite losses in a row


def _bookkeeping(config):
    """Logging, checkpoints, profiling, evaluators, caches."""
    config.log_every_steps = 20
    # An epoch end is saved when its validation is a new best, when it is the last, and every
    # this many epochs (0: only those); a crash loses at most that many epochs (replayed
    # exactly on resume). Each save costs about 0.8 s on an H200 for ResNet-50.
    config.checkpoint_every_epochs = 5
    config.checkpoint_every_steps = 0  # extra saves between epoch ends; 0 = none
    config.async_checkpoints = True
    config.writer = "auto"  # 'auto' (clu when TensorFlow is importable), 'clu', 'jsonl'
    config.profile_steps = 5  # steps traced by the profiler after warm-up; 0 disables
    config.num_overlay_cells = 8  # fixed validation cells drawn with Grad-CAM every epoch
    config.overlay_method = "gradcam"
    config.evaluators = EVALUATORS  # what the end of the run evaluates (docstring above)
    config.prefetch = 2  # batches staged on the devices ahead of the step
    # Persistent XLA cache: folds 2-5 and reruns load the compiled steps instead of compiling
    # again. 'auto' = $SIPAK_JAX_XLA_CACHE or ~/.cache/sipak_jax/xla; '' = off.
    config.compilation_cache_dir = "auto"


def _workdir(config):
    """What a rerun on an existing workdir may do (never compared with its config.json)."""
    config.reevaluate = False  # True: read the test fold again for a finished run
    config.allow_more_epochs = False  # True: a resumed run may raise num_epochs
