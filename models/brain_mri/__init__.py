"""The brain MRI detector: its descriptor and, in weights/, the shipped weights and model card.

The model code is detector.py beside it (dicom_node.models.brain_mri.detector), imported by the loader only, when
a worker loads the detector: this module stays torch-free."""

from __future__ import annotations

from pathlib import Path

from dicom_node.models.spec import DetectorSpec, SpecCode

SPEC = DetectorSpec(
    name="brain_mri",
    description="brain MRI (any sequence), one-class anomaly detection per slice",
    loader="dicom_node.models.brain_mri.detector:load_brain_mri",
    detector_class="dicom_node.models.brain_mri.detector:BrainMRIDetector",
    default_config="dicom_node.models.brain_mri.detector:default_config",
    weights=Path(__file__).resolve().parent / "weights",
    # The head foreground the brain detector reads (it has no brain mask).
    anatomy=SpecCode("69536005", "SCT", "Head"),
    procedure=SpecCode("24590-2", "LN", "MR Brain"),
    # Brain MR series of real images (localizers are excluded before, by the node's own rules).
    selection=(
        {
            "name": "derived",
            "reason": "derived or secondary image",
            "image_type_includes": ["DERIVED"],
            "modality": ["MR"],
        },
        {
            "name": "brain-mr",
            "detector": "brain_mri",
            "modality": ["MR"],
            "body_part_examined": ["BRAIN", "HEAD", "SKULL", ""],
            "min_instances": 1,
        },
    ),
)
