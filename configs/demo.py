r"""The demo: trains and evaluates end to end on a synthetic SIPaKMeD, on 2 CPU cores, offline.

Command (the README's first command):

    python main.py --config=configs/demo.py --workdir=workdirs/demo

On a machine with no dataset, no weights and no network it writes a synthetic SIPaKMeD
(`tfds_sipakmed.synthetic`: background and stain randomised per cluster image, so only
morphology carries the label) into `WORKDIR/data/raw`, builds the TFDS dataset through the
real builder into `WORKDIR/data/tfds`, trains a small ResNet from scratch on folds 1-4 (with a
grouped validation split carved from them), evaluates the best checkpoint once on fold 0 and
writes every output: `results.json`, `metrics.jsonl`, TensorBoard events, `checkpoints/`,
`metadata.json`, calibration, Grad-CAM overlays of fixed validation cells, `report.html`.

Expected result: test accuracy >= 0.90 on the synthetic fold 0 (121 cells), in under 10
minutes on 2 CPU cores. Measured: 0.983 (macro-F1 0.984; best epoch 7 of 12) in 71 s wall on 2
CPU cores shared with other jobs, data build and compilation included; the whole console is 32
lines (the config, one line per epoch, the test figures, where the results are). Started again
on the same workdir it prints where the results are and exits; `--verbosity=1` shows the
libraries' own logs.
"""

from configs import resnet50
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, fold="0")
    config = resnet50.get_config()
    config.fold = args["fold"]
    config.synthetic.cells_per_class = 120
    config.synthetic.seed = 0
    config.image_size = 64
    config.augment = ("rot90", "flip")

    config.model.depth = 18
    config.model.width = 16
    config.model.stage_sizes = (1, 1, 1, 1)
    config.init_from = ""  # from scratch: no weights to download
    config.compute_dtype = "float32"

    config.batch_size = 32
    config.eval_batch_size = 128
    config.num_epochs = 12
    config.head_epochs = 0
    config.warmup_epochs = 1
    config.learning_rate = 3e-3
    config.weight_decay = 1e-4
    config.label_smoothing = 0.0

    config.log_every_steps = 10
    config.profile_steps = 0
    # Overlays (TensorBoard and the report) use `saliency.overlay_stage`: at 64 px, layer2's 8x8
    # map (layer4's is 2x2: every cell's evidence would fill the same quadrant).
    config.num_overlay_cells = 4
    return config
