"""Per-process state of a worker: settings, the job database, and detectors loaded once and kept warm."""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery, current_app

from dicom_node.config import Settings
from dicom_node.db import Database
from dicom_node.models.base import Detector, DetectorRegistry
from dicom_node.models.registry import ENTRY_POINT_GROUP, default_registry

log = logging.getLogger(__name__)

PLUGIN_GROUP = ENTRY_POINT_GROUP
_CONTEXT_ATTRIBUTE = "_dicom_node_context"


def detector_registry() -> DetectorRegistry:
    """Every installed detector: the shipped ones and those of plugins (``dicom_node.detectors`` entry points).

    A plugin's entry point named like a shipped detector replaces it (a site's own model for ``brain_mri``): a loader
    function replaces its loader, a DetectorSpec the whole detector (models/registry.py says the rule). The test
    suite uses this to run real workers with small test detectors (tests/plugins); the product ships none."""
    return default_registry()


def resolve_device(spec: str, process_index: int = 0) -> str:
    """``auto``: CUDA when available (pool process i on GPU i mod count), CPU otherwise."""
    if spec == "cpu" or spec.startswith("cuda:"):
        return spec
    import torch

    if not torch.cuda.is_available():
        if spec == "cuda":
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        return "cpu"
    return f"cuda:{process_index % torch.cuda.device_count()}"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset, ``taskset``), else the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads(processes: int) -> int:
    """torch's intra-op threads for each of ``processes`` CPU pool processes: the CPUs shared out among them, at
    least one. torch's own default (every core in every process) oversubscribes the CPU as soon as there are two
    pool processes: on 2 cores, 2 processes x 2 threads ran a 176-slice MR backlog 1.5x slower than 2 x 1
    (docs/workers.md, "CPU workers")."""
    return max(1, available_cpus() // max(processes, 1))


def set_cpu_threads(processes: int) -> int | None:
    """In a CPU pool process: share the CPUs out (``cpu_threads``) unless ``OMP_NUM_THREADS`` says otherwise.
    Returns the threads set, None when left to ``OMP_NUM_THREADS``."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = cpu_threads(processes)
    torch.set_num_threads(threads)
    return threads


def pool_process_index() -> int:
    """Index of this prefork pool process (0 outside a pool)."""
    try:
        from billiard.process import current_process

        return int(getattr(current_process(), "index", 0) or 0)
    except Exception:  # not a billiard process
        return 0


# On CPU a forward pass takes at most this many slices, whatever ``detectors.<name>.batch_size`` says: larger batches
# cost more CPU per slice there (176-slice MR, one thread, CPU seconds per series: batch 16 8.5-8.7, batch 4
# 5.7-5.8, batch 2 4.6-5.3, batch 1 4.8-5.8; the same scores to 1e-6). Measured on a 2-core x86 host: re-measure
# before raising it for a larger CPU (docs/workers.md, "CPU workers").
CPU_MAX_BATCH = 2


def batch_size_for(configured: int, device: str) -> int:
    """Slices per forward pass: ``detectors.<name>.batch_size``, at most ``CPU_MAX_BATCH`` on the CPU."""
    return min(configured, CPU_MAX_BATCH) if device == "cpu" else configured


def apply_batch_size(detector: Detector, batch_size: int) -> None:
    """Slices per forward pass, from ``detectors.<name>.batch_size``: the detector's own ``batch_size`` attribute,
    or that of its ``config`` (the shipped image detectors keep it in their DetectorConfig)."""
    config = getattr(detector, "config", None)
    if hasattr(detector, "batch_size"):
        detector.batch_size = batch_size
    elif config is not None and hasattr(config, "batch_size"):
        config.batch_size = batch_size


class WorkerContext:
    """What a task needs in this process; built on first use after the fork, never shared across processes."""

    def __init__(self, settings: Settings, device_spec: str | None = None) -> None:
        self.settings = settings
        self.pid = os.getpid()
        # The worker's main process migrated the schema before forking.
        self.db = Database(settings.database_url, upgrade=False)
        self._device_spec = device_spec or settings.workers.device
        self._device: str | None = None
        self._registry: DetectorRegistry | None = None
        self._detectors: dict[str, Detector] = {}
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = resolve_device(self._device_spec, pool_process_index())
        return self._device

    def detector(self, name: str) -> Detector:
        """The detector ``name``, loaded on first use and kept for the life of the process."""
        with self._lock:
            if name not in self._detectors:
                if self._registry is None:
                    self._registry = detector_registry()
                model_dir = self.settings.detector(name).model_dir
                detector = self._registry.load(name, model_dir, self.device)
                batch = batch_size_for(self.settings.detector(name).batch_size, self.device)
                apply_batch_size(detector, batch)
                log.info(
                    "detector %s loaded on %s (model %s, batch %d)", name, self.device, detector.identity.version, batch
                )
                self._detectors[name] = detector
            return self._detectors[name]

    def loaded_on_cpu(self) -> bool:
        """Whether this process loaded a detector, on the CPU."""
        return bool(self._detectors) and self._device == "cpu"

    def close(self) -> None:
        self.db.dispose()


def get_context(app: Celery | None = None) -> WorkerContext:
    """This process's WorkerContext for ``app`` (the current Celery app by default)."""
    app = app or current_app
    context: WorkerContext | None = getattr(app, _CONTEXT_ATTRIBUTE, None)
    if context is None or context.pid != os.getpid():
        settings = app.conf.get("dicom_node_settings")
        if not isinstance(settings, Settings):
            raise RuntimeError("the Celery app was not made by workers.app.create_app(settings)")
        context = WorkerContext(settings, app.conf.get("dicom_node_device"))
        setattr(app, _CONTEXT_ATTRIBUTE, context)
    return context
