"""The chest X-ray detector: its descriptor and, in weights/, the shipped weights and model card.

The model code is detector.py beside it (dicom_node.models.chest_xray.detector, with views.py), imported by the
loader only, when a worker loads the detector: this module stays torch-free."""

from __future__ import annotations

from pathlib import Path

from dicom_node.models.spec import DetectorSpec, SpecCode

SPEC = DetectorSpec(
    name="chest_xray",
    description="frontal (PA/AP) chest radiographs, one-class anomaly detection",
    loader="dicom_node.models.chest_xray.detector:load_chest_xray",
    detector_class="dicom_node.models.chest_xray.detector:ChestXrayDetector",
    default_config="dicom_node.models.chest_xray.detector:default_config",
    weights=Path(__file__).resolve().parent / "weights",
    anatomy=SpecCode("51185008", "SCT", "Thorax"),
    # A radiograph's score is an average over the lung fields and its map a brightness atlas whose weaker blobs are
    # mostly anatomy (heart border, shoulders) rather than a second finding, so it shows its strongest region only.
    # (Before its map covered the whole lung field, every flagged radiograph of cxr_nih/val had one region anyway;
    # docs/results.md.)
    region_rules={"max_regions": 1},
    unsized_long_side_mm=430.0,  # a 43 cm detector
    procedure=SpecCode("36554-4", "LN", "XR Chest Single view"),
    # Frontal (PA/AP) chest CR/DX; lateral views are left out.
    selection=(
        {
            "name": "lateral-chest",
            "reason": "lateral view",
            "modality": ["CR", "DX"],
            "view_position": ["LL", "RL", "LAT", "LATERAL", "RLD", "LLD"],
        },
        {
            "name": "frontal-chest",
            "detector": "chest_xray",
            "modality": ["CR", "DX"],
            "body_part_examined": ["CHEST", "THORAX", "LUNG"],
            "view_position": ["PA", "AP", ""],
        },
    ),
)
