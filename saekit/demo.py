"""`DemoConfig` + `run(cfg)`: the whole pipeline on the embedded default, end to end, offline.

    harvest (embedded model + corpus) -> OUT/store
    train a TopK SAE on it            -> OUT/train   (sae/, sae_lens/, checkpoints)
    pursue gp and mp at several k     -> OUT/pursue  (codes.zarr, report.json/.md, fvu_vs_l0.png),
      on the first --rows of the rows training held out (never trained on);
      with --downstream: every encoding spliced into the model (ΔCE, KL)
    a dashboard of the most active    -> OUT/dashboard (index.html, latent_<i>.html): each latent
      latents, encoder vs gp            under the encoder and under gp's codes, side by side

Each stage is that stage's own `run(cfg)` with `resume` on, so a second demo run reuses what is
finished (a complete store, the final checkpoint, finished code shards) and an interrupted one
continues. OUT/demo.json records the sizes: a rerun with other sizes is refused rather than
mixing settings. One of the pursuit k's is the encoder's mean L0 (rounded down): the row of the
report where gradient pursuit and the encoder are compared at the same sparsity, in FVU and in
what the reconstruction does to the model.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from saekit import dashboard, harvest, pursue, train
from saekit.atomic import read_regular
from saekit.codes import group_name
from saekit.config import check_k, check_non_negative, check_positive, need
from saekit.devices import resolve_device
from saekit.errors import SaekitError, is_non_empty, output_dir
from saekit.measure.heldout import held_out_rows, sae_held_out
from saekit.pursue import PursueResult
from saekit.store import open_store
from saekit.store.shards import write_json_atomic

DEMO_FILE = "demo.json"
# What decides the demo's outputs: a rerun into the same --out must use the same values.
SIZES = ("tokens", "n_features", "k", "steps", "batch_size", "rows", "pursue_k", "methods")


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults take about 40 s on two CPU cores (one torch thread)."""

    out: str = "cache/demo"
    """Directory holding the three stages' outputs (store/, train/, pursue/)."""
    tokens: int = 200_000
    """Rows to harvest from the embedded model (middle layer's residual stream, d_model 128)."""
    n_features: int = 1024
    """Latents of the TopK SAE (8 x d_model)."""
    k: int = 16
    """TopK k of the SAE."""
    steps: int = 2000
    """Training steps."""
    batch_size: int = 512
    """Rows per training step."""
    rows: int = 8192
    """Rows the encoder and the pursuits are compared on: the first of the rows training holds out (the store's last tenth, at most 65,536)."""
    pursue_k: list[int] = field(default_factory=lambda: [4, 8, 32])
    """Pursuit k's besides the encoder's L0 (which is always added); repeat --pursue-k for several."""
    methods: list[str] = field(default_factory=lambda: ["gp", "mp"], metadata={"flag": "--method"})
    """Pursuit methods (see `saekit pursue`); repeat --method for several."""
    downstream: bool = True
    """Also splice each encoding into the model on the whole sequences inside --rows (`saekit pursue --downstream`): ΔCE and KL beside FVU."""
    dashboard: int = 32
    """Latents in the demo's dashboard (the most often active), each under the encoder and under gp at the encoder's L0; 0: no dashboard."""
    device: str = "cpu"
    """Device for every stage: 'cpu' (the demo is sized for it), 'auto' or 'cuda'."""
    progress: bool = True
    """Progress bars and stage headers on stderr."""
    threads: int = 1
    """torch CPU threads (0: torch's default). The demo's tensors are small: one thread is about as
    fast as two, and a second intra-op thread spin-waits for a core whenever another process holds
    one (measured: 533 s instead of ~30 s for the default demo next to one busy process)."""

    def __post_init__(self) -> None:
        check_non_negative("--threads", self.threads, "torch's default")
        check_non_negative("--dashboard", self.dashboard, "no dashboard")
        for name in ("tokens", "n_features", "k", "steps", "batch_size", "rows"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name))
        check_k(self.k, self.n_features, "--k", "--n-features")
        for k in self.pursue_k:
            check_k(k, self.n_features, "--pursue-k", "--n-features")
        held = len(held_out_rows(self.tokens))  # the train stage holds out the default rows
        need(
            self.rows <= held,
            f"--rows {self.rows} is more than the {held} rows training holds out of --tokens {self.tokens}; pass at most {held}",
        )


class DemoResult(NamedTuple):
    """What `run` returns."""

    store: Path
    """The harvested store."""
    train_dir: Path
    """The training run directory (its sae/ is the SAE)."""
    encoder_l0: float
    """The SAE encoder's mean L0 on the compared (held-out) rows."""
    pursue: PursueResult
    """The pursue stage's result (entries, table, out)."""
    dashboard: Path | None = None
    """The dashboard's index.html (None with --dashboard 0)."""

    def headline(self) -> str:
        """One line: gradient pursuit against the encoder at the encoder's L0 (FVU, and ΔCE and KL)."""
        k = math.floor(self.encoder_l0 + 1e-9)
        enc = next(e for e in self.pursue.entries if e.method == "encoder")
        gp = next((e for e in self.pursue.entries if e.method == "gp" and e.k == k), None)
        if gp is None:
            return f"encoder: FVU {enc.fvu:.4f} at L0 {enc.l0:.2f}"
        better = "lower" if gp.fvu < enc.fvu else "NOT lower"
        line = (
            f"gradient pursuit at k={k} (the encoder's L0): FVU {gp.fvu:.4f} vs the encoder's {enc.fvu:.4f} "
            f"({better}; {100 * (1 - gp.fvu / enc.fvu):.1f}% less unexplained variance)"
        )
        if gp.downstream is not None and enc.downstream is not None:
            g, e = gp.downstream, enc.downstream
            line += (
                f"; spliced into the model: ΔCE {g.delta_ce:.4f} vs {e.delta_ce:.4f} nats per token, "
                f"KL {g.kl_mean:.4f} vs {e.kl_mean:.4f}"
            )
        return line


def _stage(cfg: DemoConfig, i: int, what: str) -> None:
    if cfg.progress:
        print(f"[{i}/{4 if cfg.dashboard else 3}] {what}", file=sys.stderr, flush=True)


@torch.no_grad()
def encoder_l0(sae, store, hook: str, rows: range, batch_size: int = 4096) -> float:
    """Mean nonzero codes per row of the SAE's encoder over the store's `rows`."""
    total = 0
    for x in store.iter_rows(hook, batch_size, rows.start, rows.stop):
        total += int((sae.encode(x.to(sae.device)) != 0).sum())
    return total / len(rows)


def run(cfg: DemoConfig) -> DemoResult:
    """Harvest, train and pursue as `cfg` says (each stage resumed if it already ran)."""
    before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: DemoConfig) -> DemoResult:
    resolve_device(cfg.device)  # before anything is written, as every stage would
    with output_dir(cfg.out, kept="finished stages are kept", rerun="rerun the same `saekit demo` command") as out:
        _claim(out, cfg)
        return _stages(cfg, out)


def _claim(out: Path, cfg: DemoConfig) -> None:
    """Record the demo's sizes in OUT/demo.json, or refuse a directory made with other sizes (its
    stages would resume with mixed settings) or holding something else."""
    sizes = {name: getattr(cfg, name) for name in SIZES}
    path = out / DEMO_FILE
    if path.is_file():
        try:
            saved = json.loads(read_regular(path))
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            raise SaekitError(f"{path} is damaged; choose a new --out or delete {out}")
        diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in sizes.items() if saved.get(k) != v]
        if diff:
            raise SaekitError(
                f"{out} holds a demo run with other sizes ({'; '.join(diff)}); choose a new --out or delete {out}"
            )
        return
    if is_non_empty(out):
        raise SaekitError(
            f"{out} is not empty but has no {DEMO_FILE} (not a saekit demo, or one from an older saekit); choose a new --out or delete {out}"
        )
    write_json_atomic(path, sizes)


def _stages(cfg: DemoConfig, out: Path) -> DemoResult:
    _stage(cfg, 1, f"harvest {cfg.tokens:,} tokens of the embedded corpus -> {out / 'store'}")
    store_dir = harvest.run(
        harvest.HarvestConfig(
            out=str(out / "store"), tokens=cfg.tokens, device=cfg.device, resume=True, progress=cfg.progress
        )
    ).path
    store_dir = Path(store_dir)  # the demo writes under a local --out

    _stage(cfg, 2, f"train a TopK SAE ({cfg.n_features} latents, k={cfg.k}, {cfg.steps} steps) -> {out / 'train'}")
    trained = train.run(
        train.TrainConfig(
            store=str(store_dir),
            out=str(out / "train"),
            n_features=cfg.n_features,
            k=cfg.k,
            batch_size=cfg.batch_size,
            tokens=cfg.steps * cfg.batch_size,
            device=cfg.device,
            resume=True,
            progress=cfg.progress,
        )
    )

    store = open_store(store_dir)
    sae = trained.sae.eval()
    held = sae_held_out(store, sae, trained.out).rows  # what pursue compares on by default: the first --rows
    rows = range(held.start, held.start + cfg.rows)
    l0 = encoder_l0(sae, store, store.resolve_hook(None), rows)
    ks = sorted({*cfg.pursue_k, max(1, math.floor(l0 + 1e-9))})
    spliced = ", spliced into the model (ΔCE, KL)" if cfg.downstream else ""
    what = f"{cfg.rows:,} held-out rows ({rows.start}..{rows.stop - 1})"
    _stage(cfg, 3, f"pursue {', '.join(cfg.methods)} at k={ks} on {what}{spliced} -> {out / 'pursue'}")
    result = pursue.run(
        pursue.PursueConfig(
            store=str(store_dir),
            sae=str(trained.out),
            out=str(out / "pursue"),
            k=ks,
            methods=cfg.methods,
            rows=cfg.rows,
            downstream=cfg.downstream,
            device=cfg.device,
            resume=True,
            progress=cfg.progress,
        )
    )
    return DemoResult(store_dir, trained.out, l0, result, _dashboard(cfg, out, store_dir, trained.out, ks, l0))


def _dashboard(cfg: DemoConfig, out: Path, store_dir: Path, run_dir: Path, ks: list[int], l0: float) -> Path | None:
    """The dashboard of the --dashboard most active latents, encoder vs gp at the encoder's L0, on
    the compared rows. It is rebuilt on every run: it is quick, and derived from finished stages."""
    if not cfg.dashboard:
        return None
    k = max(1, math.floor(l0 + 1e-9))
    site = out / "dashboard"
    what = f"dashboard of the {cfg.dashboard} most active latents, encoder vs gp k={k}"
    _stage(cfg, 4, f"{what} -> {site}")
    if site.exists():
        shutil.rmtree(site)  # this demo's own (demo.json claims OUT), from an earlier run
    group = group_name("gp", k) if "gp" in cfg.methods and k in ks else ""
    res = dashboard.run(
        dashboard.DashboardConfig(
            store=str(store_dir),
            sae=str(run_dir),
            out=str(site),
            codes=str(out / "pursue") if group else "",
            group=group,
            top=cfg.dashboard,
            rows=cfg.rows,
            device=cfg.device,
            progress=cfg.progress,
        )
    )
    return res.index
