"""Detectors that also offer the experimental methods: the installed detector classes with the experiments' methods
added to their ``methods`` table (composition: nothing in the installed package knows about them).

    from experiments.detectors import ExperimentalBrainDetector
    from dicom_node.models.brain_mri.detector import default_config
    config = default_config(); config.method = "patchcore"
    detector = ExperimentalBrainDetector(config)   # fit / calibrate / score_each / save / load as any detector
"""

from __future__ import annotations

from dicom_node.models.brain_mri.detector import BrainMRIDetector
from dicom_node.models.image_detector import IMAGE_METHODS, ImageAnomalyDetector, MethodFactory
from experiments.methods.autoencoder import AutoencoderMethod
from experiments.methods.msde import MsdeMethod
from experiments.methods.patchcore import PatchCoreMethod
from experiments.methods.patchcore_msde import PatchCoreMsdeMethod

EXPERIMENT_METHODS: dict[str, MethodFactory] = {
    PatchCoreMethod.name: PatchCoreMethod,
    MsdeMethod.name: MsdeMethod,
    PatchCoreMsdeMethod.name: PatchCoreMsdeMethod,
    AutoencoderMethod.name: AutoencoderMethod,
}


class ExperimentalImageDetector(ImageAnomalyDetector):
    """The generic detector (whole image, everything foreground) with the experimental methods."""

    methods = {**IMAGE_METHODS, **EXPERIMENT_METHODS}


class ExperimentalBrainDetector(BrainMRIDetector):
    """brain_mri preparation and series handling with the experimental methods."""

    methods = {**BrainMRIDetector.methods, **EXPERIMENT_METHODS}
