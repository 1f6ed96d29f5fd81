"""dinopipe: DINOv3 features and training targets for 3D EM segmentation.

Axis order everywhere is (z, y, x), channels first; physical units are nanometres.

The modules, layer by layer (a module imports only from its own layer and the ones above it;
``tests/test_architecture.py`` checks the rules that matter):

* foundation — :mod:`~dinopipe.geometry` (grids, windows, tiling), :mod:`~dinopipe.runtime`
  (CPUs, device, precision, memory), :mod:`~dinopipe.atomic` (atomic outputs),
  :mod:`~dinopipe.logs`, :mod:`~dinopipe.config` (which keys change results; the schema).
* data — :mod:`~dinopipe.sheet` (the volume sheet), :mod:`~dinopipe.inputs` (input formats),
  :mod:`~dinopipe.ngff` (OME-NGFF images), :mod:`~dinopipe.chunks`, :mod:`~dinopipe.io` (all
  storage names in one import), :mod:`~dinopipe.sources` (a volume's raw, labels and output
  grid), :mod:`~dinopipe.demo`, :mod:`~dinopipe.checks` (start-up checks).
* features — :mod:`~dinopipe.backbone_spec`, :mod:`~dinopipe.backbone`, :mod:`~dinopipe.features`.
* targets — :mod:`~dinopipe.targets`.
* learning — :mod:`~dinopipe.unet`, :mod:`~dinopipe.losses`, :mod:`~dinopipe.augment`,
  :mod:`~dinopipe.loader`, :mod:`~dinopipe.checkpoint` (the model on disk),
  :mod:`~dinopipe.curves` (the loss curve), :mod:`~dinopipe.train_params` (the ``train:``
  section), :mod:`~dinopipe.objective` (input, loss, validation), :mod:`~dinopipe.train`.
* inference — :mod:`~dinopipe.predict`, :mod:`~dinopipe.segment`, :mod:`~dinopipe.linkage`
  (agglomeration of the region graph: mean linkage, hierarchical merge), :mod:`~dinopipe.evaluate`,
  :mod:`~dinopipe.baseline`, :mod:`~dinopipe.tune`: never import training (only the model
  definition and :mod:`~dinopipe.checkpoint`); :mod:`~dinopipe.distributed` (one volume's
  prediction over many jobs: the block plan and the record of finished parts).
* workflow glue — :mod:`~dinopipe.stages` (one function per rule), :mod:`~dinopipe.report`,
  :mod:`~dinopipe.cli`.

The modules the workflow imports when Snakemake parses it (config, checks, sheet, tune, io,
sources, geometry, runtime, distributed) load no torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dinopipe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
