"""A toy third detector, ``knee_xray``, for tests/test_detector_plugin.py (never shipped).

It is added the way a site's plugin would add one, without touching the product: this package's ``SPEC`` is declared
as a ``dicom_node.detectors`` entry point by a throw-away ``.dist-info`` the test writes. The spec is torch-free (the
node reads it to validate the configuration, route series, name the queue and code the result objects); the model
code (detector.py, numpy only) is imported by the loader when a worker loads the detector. The "shipped weights" in
weights/ are a model card only.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.models.spec import DetectorSpec, SpecCode

SPEC = DetectorSpec(
    name="knee_xray",
    description="toy knee radiograph detector (tests only)",
    loader="dn_knee_xray.detector:load_knee_xray",
    weights=Path(__file__).resolve().parent / "weights",
    anatomy=SpecCode("72696002", "SCT", "Knee"),
    procedure=SpecCode("KNEE-TOY", "99DNTEST", "Toy knee radiograph"),
    selection=(
        {
            "name": "knee",
            "detector": "knee_xray",
            "modality": ["CR", "DX"],
            "body_part_examined": ["KNEE"],
        },
    ),
)
