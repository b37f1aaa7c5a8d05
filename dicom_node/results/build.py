"""Build the result objects of one SeriesResult: the one entry point the delivery pipeline and the benchmark use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless

from dicom_node.models.base import SeriesResult
from dicom_node.models.regions import RegionRules, rules_for
from dicom_node.results.common import Findings, SourceSeries, align, find_findings, result_uids
from dicom_node.results.pm import build_pm
from dicom_node.results.sc import build_sc
from dicom_node.results.seg import build_seg, seg_variant
from dicom_node.results.sr import build_sr, key_frame


@dataclass(frozen=True)
class ObjectRequest:
    """One object to build: ``kind`` SEG/SR/PM/SC and, for SEG, whether empty frames are kept."""

    kind: str
    keep_empty_frames: bool = True

    @property
    def key(self) -> str:
        return f"SEG-{seg_variant(self.keep_empty_frames)}" if self.kind == "SEG" else self.kind


@dataclass
class BuiltObjects:
    source: SourceSeries
    findings: Findings
    objects: dict[str, Dataset]  # ObjectRequest.key → dataset


def build_results(
    datasets: Sequence[Dataset],
    result: SeriesResult,
    requests: Sequence[ObjectRequest],
    *,
    read_pixels: Callable[[Dataset], Dataset],
    predecessors: Sequence[Dataset] = (),
    rules: RegionRules | None = None,
) -> BuiltObjects:
    """Build every requested object once. ``datasets`` may be headers only; ``read_pixels`` returns the full
    instance for the key image. The SR references the SEG that keeps empty frames when one is built (all SEG
    variants share segment numbers and tracking UIDs).

    The series verdict drives every object: a Normal result has no region (no SEG, no region group in the SR), an
    Abnormal one at least one, chosen by ``rules`` (models.regions.RegionRules; when None the detector's,
    models.regions.rules_for). A re-run applies the same rules."""
    source = align(datasets, result)
    seed = result_uids(source.series_instance_uid, source.sop_instance_uids, result.model, "findings").sop_instance_uid
    rules = rules if rules is not None else rules_for(result.model.detector)
    findings = find_findings(source, result.pixel_threshold, seed, abnormal=result.is_abnormal, rules=rules)
    objects: dict[str, Dataset] = {}
    wanted = {request.key: request for request in requests}
    for key, request in wanted.items():
        if request.kind != "SEG":
            continue
        seg = build_seg(
            source, findings, result.model, result.pixel_threshold, keep_empty_frames=request.keep_empty_frames
        )
        if seg is not None:
            objects[key] = seg
    if "SR" in wanted:
        referenced = objects.get("SEG-all-frames") or objects.get("SEG-non-empty-frames")
        if referenced is None and source.is_volume and findings.findings:
            # The brain findings are TID 1411 references to SEG segments: build the SEG even if not sent.
            referenced = build_seg(source, findings, result.model, result.pixel_threshold)
        objects["SR"] = build_sr(
            source,
            findings,
            result.model,
            series_score=result.series_score,
            image_threshold=result.image_threshold,
            pixel_threshold=result.pixel_threshold,
            seg=referenced,
            predecessors=predecessors,
        )
    if "PM" in wanted:
        # JPEG 2000 Lossless: a tenth of the uncompressed size; the SCU sends it decompressed to a PACS that
        # does not accept it.
        pm = build_pm(source, result.model, result.pixel_threshold, transfer_syntax_uid=JPEG2000Lossless)
        if pm is not None:
            objects["PM"] = pm
    if "SC" in wanted:
        frame = key_frame(source, findings)
        objects["SC"] = build_sc(
            read_pixels(source.datasets[frame]),
            source.maps[frame],
            result.model,
            result.pixel_threshold,
            source.series_instance_uid,
            source.sop_instance_uids,
        )
    return BuiltObjects(source, findings, objects)
