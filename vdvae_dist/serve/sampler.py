"""The model side of the service, free of Ray: batched sampling and reconstruction."""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ..model import count_parameters
from ..model import bits_per_dim
from ..artifacts.weights import Weights
from .gate import Heartbeat


def pack(jobs: list[dict], max_images: int) -> list[list[int]]:
    """Indices of jobs grouped into forward passes of at most `max_images` images (a job is
    never split: its noise comes from its own seed, drawn in one piece)."""
    groups: list[list[int]] = []
    images = 0
    for i, job in enumerate(jobs):
        if not groups or images + job["n"] > max_images:
            groups.append([])
            images = 0
        groups[-1].append(i)
        images += job["n"]
    return groups


class Sampler:
    def __init__(self, weights: Weights, device: torch.device, max_images: int, heartbeat: Heartbeat | None = None):
        self.weights, self.device, self.max_images = weights, device, max_images
        self.model = weights.model.to(device).eval()
        # beats at the start of a call and after every forward pass: the replica's health
        # follows the passes, not the batch (a batch of 32 x 64 images runs many passes)
        self.heartbeat = heartbeat or Heartbeat()

    def info(self) -> dict:
        w, m = self.weights, self.model
        c, h, wd = m.data_shape
        return {"preset": w.cfg.preset, "step": w.step, "weights": "EMA (fp32)", "source": w.source,
                "parameters": count_parameters(m), "latent_groups": m.num_groups, "image_shape": [c, h, wd],
                "likelihood": w.cfg.model.likelihood, "device": str(self.device),
                # sampling runs in fp32 whatever the run trained in (engine.precision)
                "precision": f"fp32 (serving; the run trained with engine.precision={w.cfg.engine.precision})",
                "training_metrics": w.metrics}

    def sample_many(self, jobs: list[dict]) -> list[np.ndarray | Exception]:
        """Each job {n, temperature (one per group), seed} -> uint8 (n, C, H, W), or the
        exception its forward pass raised: a failing forward pass of several jobs is re-run
        job by job, so one bad job fails alone. The images do not depend on which other jobs
        share the forward pass, so a job whose request has gone (its "gone" event set: timed
        out, or the client left) is dropped from the passes not yet run: a burst of large
        requests that time out does not keep the model busy for nobody."""
        out: list[np.ndarray | Exception | None] = [None] * len(jobs)
        self.heartbeat.beat()
        try:
            for group in pack(jobs, self.max_images):
                for i in group:
                    if _gone(jobs[i]):
                        out[i] = TimeoutError("the request had gone before its forward pass")
                group = [i for i in group if out[i] is None]
                if not group:
                    continue
                try:
                    results = self._forward([jobs[i] for i in group])
                except Exception as e:
                    if len(group) == 1:
                        out[group[0]] = e
                        continue
                    results = []
                    for i in group:
                        try:
                            results += self._forward([jobs[i]])
                        except Exception as e1:
                            results.append(e1)
                for i, result in zip(group, results):
                    out[i] = result
        finally:
            self.heartbeat.stop()
        return out

    def _forward(self, jobs: list[dict]) -> list[np.ndarray]:
        try:
            for job in jobs:
                inject_fault(job.get("fault"))
            images = self.model.sample_batch([(job["n"], job["temperature"], job["seed"]) for job in jobs])
            return [im.cpu().numpy() for im in images]
        finally:
            self.heartbeat.beat()  # a pass that ended, failed or not, is progress

    @torch.no_grad()
    def reconstruct(self, image_CHW: np.ndarray, depth: int, temperature: list[float], seed: int) -> tuple[np.ndarray, float]:
        """(reconstruction uint8 (C, H, W), bits/dim of the image under the model)."""
        self.heartbeat.beat()
        try:
            x = torch.from_numpy(image_CHW)[None].to(self.device)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # a one-sample ELBO: seeded, so it is reproducible
                torch.manual_seed(seed)
                elbo = self.model(x)
            self.heartbeat.beat()
            recon = self.model.reconstruct(x, depth, temperature, seed=seed)
            return recon[0].cpu().numpy(), float(bits_per_dim(float(elbo.nelbo[0]), elbo.dims))
        finally:
            self.heartbeat.stop()


def _gone(job: dict) -> bool:
    gone = job.get("gone")
    return gone is not None and gone.is_set()


FAULTS = ("raise", "hang", "slow")
SLOW_FAULT_S = 2.0  # of a 3 s timeout in the tests: a pass running when its requests time out outlasts them


def inject_fault(fault: str | None) -> None:
    """Test-only (serve.fault_injection, X-VDVAE-Fault header): "raise" fails the forward pass
    holding the job, "hang" blocks it until the replica is replaced, "slow" makes it (or the
    upload's decoding, for /reconstruct) take SLOW_FAULT_S longer. None does nothing."""
    if fault == "raise":
        raise RuntimeError("injected fault: this forward pass fails (serve.fault_injection)")
    if fault == "hang":
        threading.Event().wait()
    if fault == "slow":
        time.sleep(SLOW_FAULT_S)
