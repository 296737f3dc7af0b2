"""Training M on the encoded series, with checkpoints and exact resume.

Every batch is a pure function of (seed, step) (episodes regime) or (seed, epoch, chunk)
(streams regime), and so is the noise that samples z; the checkpoint holds the weights, the
optimiser and, for streams, the LSTM state carried into the next chunk. A killed run resumes
at the step after its last checkpoint and continues the same learning curve, bit for bit.

Everything the run needs is checked before anything is written: series present, none empty,
long enough for the regime's sequence length, of the configured z size, and encoded by the
V of this run (series of another V would train M on latents that V cannot decode).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wmlab import checkpoint
from wmlab.config import Config, load_config_file
from wmlab.data.series import Series, SeriesStore
from wmlab.device import resolve_bf16, resolve_device
from wmlab.errors import StoreError, WmlabError
from wmlab.memory.data import SeriesBatch, episode_batch, locate_chunk, stream_batch
from wmlab.memory.evaluation import batch_losses, precision_recall, validate
from wmlab.memory.model import (
    FINAL_WEIGHTS,
    INITIAL_Z,
    MDNRNN,
    MdrnnShape,
    check_tau,
    load_mdrnn,
)
from wmlab.metrics import MetricsLogger
from wmlab.native import keep_freed_memory
from wmlab.runs import RunLayout, ensemble_member

TRAIN_CHECKPOINT = "train"
LOG_EVERY = 10
VALIDATE_EVERY = 100


def shape_from_config(cfg: Config, z_dim: int, action_dim: int) -> MdrnnShape:
    m = cfg.mdrnn
    return MdrnnShape(z_dim=z_dim, action_dim=action_dim, hidden=m.hidden,
                      gaussians=m.gaussians, done_head=m.done_head, reward_head=m.reward_head,
                      restart_input=m.restart_input)


@dataclass
class MdrnnTrainResult:
    folder: str
    steps: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    sequences_per_second: float = 0.0
    steps_per_second: float = 0.0
    finished: bool = True


@dataclass
class SeriesSet:
    """The train/validation series of a run and the V fingerprint they were encoded by."""

    train: list[Series]
    val: list[Series]
    fingerprint: str = ""


def learning_rate(cfg: Config, step: int) -> float:
    m = cfg.mdrnn
    return (m.lr - m.lr_min) * m.lr_decay ** step + m.lr_min


def batch_parts(requested: int, device: torch.device, batch_size: int,
                regime: str = "streams") -> int:
    """How many row groups of each batch run in parallel threads (``mdrnn.batch_parts``):
    0 = two for streams (Doom) on a CPU where torch has two or more threads, one elsewhere.

    Streams batches restart episodes mid-chunk and run in ``lstm_scan``, whose small
    per-step products are what two threads share badly. Episodes batches (CarRacing) never
    reset after their first step and run in oneDNN's fused LSTM, which uses both cores well
    on its own: split, it ran at 0.45x (`wmlab bench memory`). A GPU runs the whole batch
    as one program."""
    if requested > 0:
        return max(1, min(requested, batch_size))
    if device.type != "cpu" or torch.get_num_threads() < 2 or regime != "streams":
        return 1
    return min(2, batch_size)


class BatchBackward:
    """The forward and backward pass of one batch, as row groups in parallel threads.

    M's LSTM is a chain of small dependent products (each of 200 steps multiplies 32 x 512
    by 512 x 2,048), which two OpenMP threads share badly: the second core adds ~45%. Two
    threads that each run half the rows on their own core (one OpenMP thread apiece; torch
    ops release the GIL) ran the demo's batches 1.2x faster than that. The gradient is still
    the whole batch's: each group's loss (a mean over its real steps) is weighted by its
    share of the batch's real steps, so the weighted sum is the mean over all of them, the
    same function the single pass differentiates; only the order of float additions differs.
    """

    def __init__(self, parts: int, threads: int | None = None) -> None:
        self.parts = max(1, parts)
        total = threads if threads is not None else torch.get_num_threads()
        self.threads = max(1, total // self.parts)
        self.pool = ThreadPoolExecutor(self.parts, thread_name_prefix="wmlab-m") \
            if self.parts > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __call__(self, model: MDNRNN, batch: SeriesBatch, z_in: torch.Tensor,
                 z_next: torch.Tensor, done_weight: float, state=None, bf16: bool = False,
                 dropout_mask: torch.Tensor | None = None, reward_over_weight: float = 1.0
                 ) -> tuple[dict[str, Any], Any]:
        """Fill every parameter's ``.grad`` with the batch's gradient; returns the loss
        parts (as ``batch_losses``) and the state after the batch. ``dropout_mask``: the
        whole batch's, cut into the groups' rows like the batch."""
        if self.pool is None or len(z_in) < 2:
            loss, parts, state_out = batch_losses(model, batch, z_in, z_next, done_weight,
                                                  state, bf16, dropout_mask,
                                                  reward_over_weight)
            loss.backward()
            return parts, state_out
        params = [p for p in model.parameters() if p.requires_grad]
        bounds = np.linspace(0, len(z_in), self.parts + 1).round().astype(int)
        groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        real_steps = max(float(batch.mask.sum()), 1.0)

        def group_backward(rows: slice):
            torch.set_num_threads(self.threads)  # per thread: the caller keeps its own
            state_in = None if state is None else (state[0][:, rows], state[1][:, rows])
            loss, parts, state_out = batch_losses(model, batch.rows(rows), z_in[rows],
                                                  z_next[rows], done_weight, state_in, bf16,
                                                  None if dropout_mask is None
                                                  else dropout_mask[rows],
                                                  reward_over_weight)
            share = float(batch.mask[rows].sum()) / real_steps
            grads = torch.autograd.grad(loss * share, params, allow_unused=True)
            return grads, parts, share, state_out

        results = list(self.pool.map(group_backward, groups))
        for i, param in enumerate(params):
            grads = [r[0][i] for r in results if r[0][i] is not None]
            param.grad = torch.stack(grads).sum(0) if grads else None
        parts: dict[str, Any] = {}
        for _, group_parts, share, _ in results:
            for key, value in group_parts.items():
                if key in ("tp", "fp", "fn"):
                    parts[key] = parts.get(key, 0) + value
                else:
                    parts[key] = parts.get(key, 0.0) + share * value
        state_out = (torch.cat([r[3][0] for r in results], 1),
                     torch.cat([r[3][1] for r in results], 1))
        return parts, state_out


# ---------------------------------------------------------------------------------------------
# Inputs and their checks


def _hash_split(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split by a hash of (seed, id), for series whose episode store is not at hand."""
    def score(i: str) -> float:
        digest = hashlib.sha256(f"{seed}:{i}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    val = [i for i in ids if score(i) < fraction]
    train = [i for i in ids if score(i) >= fraction]
    if fraction > 0 and len(ids) >= 2 and (not val or not train):
        ranked = sorted(ids, key=score)
        val, train = ranked[:1], ranked[1:]
    return sorted(train), sorted(val)


def load_series(cfg: Config) -> SeriesSet:
    """(train, validation) series of the run, split by whole episodes as V's data were;
    with ``mdrnn.earlier_data``, those of the run's earlier iterations too."""
    own = _store_series(cfg, cfg.store_url())
    train, val = list(own.train), list(own.val)
    for url in earlier_stores(cfg):
        earlier = _store_series(cfg, url)
        if earlier.fingerprint != own.fingerprint:
            raise WmlabError(f"mdrnn.earlier_data: the series in {url} were encoded by V "
                             f"{earlier.fingerprint}, this iteration's by V {own.fingerprint}; "
                             "M learns from one V's latents: keep V in later iterations "
                             "(vae.epochs = 0) or set mdrnn.earlier_data = false")
        train += earlier.train
        val += earlier.val
    return SeriesSet(train, val, own.fingerprint)


def earlier_stores(cfg: Config) -> list[str]:
    """The episode stores of the run's iterations before this one (each as its recorded
    config names it), oldest first, where ``mdrnn.earlier_data`` is on; else none."""
    layout = RunLayout.of(cfg)
    if not cfg.mdrnn.earlier_data or layout.iteration_number == 1:
        return []
    return [load_config_file(layout.iteration(k).config).store_url()
            for k in range(1, layout.iteration_number)]


def _store_series(cfg: Config, url: str) -> SeriesSet:
    """One store's series, split by whole episodes as V's data were."""
    series_store = SeriesStore.current(url)
    ids = series_store.ids()
    if not ids:
        raise WmlabError(f"no encoded series in {url}: run `wmlab encode` first")
    fraction = cfg.vae.val_fraction if len(ids) >= 2 else 0.0
    try:
        from wmlab.data import EpisodeStore

        train_ids, val_ids = EpisodeStore.open(url).split(fraction, seed=cfg.run.seed)
        present = set(ids)
        train_ids = [i for i in train_ids if i in present]
        val_ids = [i for i in val_ids if i in present]
    except StoreError:  # series without their episodes (copied alone): same rule, own hash
        train_ids, val_ids = _hash_split(ids, fraction, cfg.run.seed)
    train = [series_store.load(i) for i in train_ids]
    val = [series_store.load(i) for i in val_ids]
    return SeriesSet(train, val, series_store.fingerprint)


def check_series(cfg: Config, data: SeriesSet) -> None:
    """Refuse series M cannot learn from with this config, naming the fix."""
    m = cfg.mdrnn
    everything = data.train + data.val
    if not data.train:
        raise WmlabError("no encoded series to train M on: collect episodes, train V and run "
                         "`wmlab encode` first")
    empty = [s.episode_id for s in everything if s.length == 0]
    if empty:
        raise WmlabError(f"{len(empty)} encoded episode(s) have no steps (e.g. {empty[0]}): "
                         "remove them from the store and run `wmlab encode` again")
    z_dim, action_dim = data.train[0].mu.shape[1], data.train[0].actions.shape[1]
    for s in everything:
        if s.mu.shape != (s.length + 1, z_dim) or s.actions.shape != (s.length, action_dim):
            raise WmlabError(f"series {s.episode_id} has latents {s.mu.shape} and actions "
                             f"{s.actions.shape}, unlike the others: run `wmlab encode` again")
    if z_dim != cfg.vae.z_dim:
        raise WmlabError(f"the series have z of size {z_dim} but vae.z_dim is {cfg.vae.z_dim}: "
                         "they were encoded by a different V; re-run `wmlab encode` with this "
                         "run's V or use the matching preset")
    longest = max(s.length for s in data.train)
    if m.regime == "episodes" and longest < m.seq_len:
        raise WmlabError(f"every training episode is shorter than mdrnn.seq_len = {m.seq_len} "
                         f"steps (the longest has {longest}): lower it, e.g. --set "
                         f"mdrnn.seq_len={longest}, or collect longer episodes")
    if m.regime == "streams" and sum(s.length for s in data.train) < m.batch_size * m.seq_len:
        total = sum(s.length for s in data.train)
        raise WmlabError(f"{total} training steps cannot fill {m.batch_size} streams of "
                         f"{m.seq_len}-step chunks: lower mdrnn.batch_size or mdrnn.seq_len, "
                         "or collect more episodes")
    _check_fingerprint(cfg, data.fingerprint)
    if m.done_head and m.calibration_episodes > 0:
        check_tau(cfg.dream.tau)  # the M stage ends by calibrating the dream at dream.tau


def _check_fingerprint(cfg: Config, fingerprint: str) -> None:
    """Series must come from this run's V, and a resumed M from the same series."""
    if not fingerprint:
        return
    vision = RunLayout.of(cfg).vision
    if checkpoint.checkpoint_exists(vision, "vae"):
        v_fingerprint = checkpoint.read_info(vision, "vae").get("fingerprint", "")
        if v_fingerprint and v_fingerprint != fingerprint:
            raise WmlabError(f"the series in {cfg.store_url()} were encoded by V {fingerprint} "
                             f"but this run's V is {v_fingerprint}: run `wmlab encode` with "
                             "this run's V first")
    folder = RunLayout.of(cfg).memory
    if checkpoint.checkpoint_exists(folder, TRAIN_CHECKPOINT):
        previous = checkpoint.read_info(folder, TRAIN_CHECKPOINT).get("series", "")
        if previous and previous != fingerprint:
            raise WmlabError(f"the M checkpoint in {folder} was trained on series of V "
                             f"{previous}, not {fingerprint}: delete {folder} to train M anew")


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class _Training:
    """One training of M as it goes: the model, its optimiser and how far it has come.

    ``carried`` is the LSTM state the streams regime carries into its next chunk (the
    checkpoint keeps it); ``plan`` is the current epoch's stream layout, kept so that
    ``locate_chunk`` walks on from it rather than from epoch 0 at every step.
    """

    cfg: Config
    train: list[Series]
    device: torch.device
    bf16: bool
    model: MDNRNN
    optimizer: torch.optim.Optimizer
    folder: str
    info: dict[str, Any]
    step: int = 0
    carried: tuple[torch.Tensor, torch.Tensor] | None = None
    plan: Any = None

    def save(self) -> None:
        """The training checkpoint at this step (what a resume continues from)."""
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.carried is not None:
            state["h"] = self.carried[0].detach().cpu()
            state["c"] = self.carried[1].detach().cpu()
        checkpoint.save_checkpoint(self.folder, TRAIN_CHECKPOINT, self.step,
                                   self.model.state_dict(), state, self.info)

    def next_batch(self) -> tuple[SeriesBatch, Any]:
        """This step's batch on the device and the LSTM state it starts from."""
        m, seed = self.cfg.mdrnn, self.cfg.run.seed
        if m.regime == "episodes":
            batch = episode_batch(self.train, m.batch_size, m.seq_len, seed, self.step)
            state_in = None
        else:
            self.plan, chunk = locate_chunk(self.train, m.batch_size, m.seq_len, seed,
                                            self.step, self.plan)
            batch = stream_batch(self.train, self.plan, chunk, m.seq_len)
            state_in = None if batch.new_streams else self.carried
        return batch.to(self.device), state_in

    def learn(self, batch: SeriesBatch, state_in: Any, backward: BatchBackward
              ) -> dict[str, Any]:
        """One optimiser step on ``batch``, then the next step; returns the loss parts."""
        m = self.cfg.mdrnn
        # the noise that samples z is a function of (seed, step), like the batch
        generator = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + self.step)
        z_in, z_next = batch.sample_z(generator)
        kept = draw_dropout_mask(z_in.shape[:2], self.model, generator, z_in.device)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        parts, state_out = backward(self.model, batch, z_in, z_next, m.done_weight, state_in,
                                    self.bf16, kept, m.reward_over_weight)
        torch.nn.utils.clip_grad_value_(self.model.parameters(), m.grad_clip)
        self.optimizer.step()
        if m.regime == "streams":
            self.carried = (state_out[0].detach(), state_out[1].detach())
        self.step += 1
        return parts


def draw_dropout_mask(rows_steps: torch.Size, model: MDNRNN, generator: torch.Generator,
                      device: torch.device) -> torch.Tensor | None:
    """The units of h (B, T, H) that reach M's head in this batch, or None without dropout.

    Drawn after the z noise from the step's generator (on the CPU, as the z noise), so the
    mask is a function of (seed, step) like the batch: a resumed run drops the units an
    unbroken one would have, and the batch's row groups (``BatchBackward``) cut one mask.
    """
    if model.dropout <= 0.0:
        return None
    shape = (*rows_steps, model.shape.hidden)
    return (torch.rand(shape, generator=generator) >= model.dropout).to(device)


@dataclass
class _Throughput:
    """Sequences and real (unpadded) steps trained on since ``started``."""

    started: float
    sequences: int = 0
    steps: int = 0

    def add(self, sequences: int, steps: int) -> None:
        self.sequences += sequences
        self.steps += steps

    def rates(self) -> tuple[float, float]:
        """(sequences, steps) per second."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return self.sequences / elapsed, self.steps / elapsed


def _series_set(cfg: Config, series: SeriesSet | tuple[list[Series], list[Series]] | None
                ) -> SeriesSet:
    """The series to train on: given, or the run's own."""
    if series is None:
        return load_series(cfg)
    if isinstance(series, SeriesSet):
        return series
    return SeriesSet(list(series[0]), list(series[1]))


def _new_model(cfg: Config, shape: MdrnnShape, device: torch.device, member: int = 0
               ) -> MDNRNN:
    """M's initial weights: from the run's seed, or the trained M of ``mdrnn.init_from``
    (for an ensemble's member k, that folder's member k where it has one)."""
    init_from = cfg.mdrnn.init_from
    if init_from and checkpoint.checkpoint_exists(ensemble_member(init_from, member),
                                                  FINAL_WEIGHTS):
        init_from = ensemble_member(init_from, member)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)  # the initial weights belong to the run's seed
        model = MDNRNN(shape, cfg.mdrnn.dropout).to(device)
    if init_from:  # begin from a trained M (the previous iteration's)
        previous, _ = load_mdrnn(init_from)
        if previous.shape != shape:
            raise WmlabError(f"mdrnn.init_from: the M in {init_from} has shape "
                             f"{previous.shape}, this run's is {shape}: use an M of the same "
                             "size, trained on the same env")
        model.load_state_dict(previous.state_dict())
    return model


def _start_training(cfg: Config, data: SeriesSet, device: torch.device, member: int = 0
                    ) -> _Training:
    """M, its optimiser and the step to go on from, restored from the run's checkpoint if
    there is one (refused when it was made with other batching). ``cfg`` carries the
    member's seed (``member_config``)."""
    m = cfg.mdrnn
    train = data.train
    bf16 = resolve_bf16(m.bf16, device)
    shape = shape_from_config(cfg, train[0].mu.shape[1], train[0].actions.shape[1])
    model = _new_model(cfg, shape, device, member)
    optimizer = torch.optim.Adam(model.parameters(), lr=m.lr)
    # what fixes the sequence of batches: a resume with other values would not continue
    # the same run
    batching = {"regime": m.regime, "batch_size": m.batch_size, "seq_len": m.seq_len,
                "seed": cfg.run.seed, "episodes": len(train)}
    # dropout: M's checkpoints say what it was trained with (load_mdrnn reads it back)
    info = {"shape": shape.__dict__, "regime": m.regime, "series": data.fingerprint,
            "env": cfg.env.name, "batching": batching, "dropout": m.dropout}
    folder = RunLayout.of(cfg).memory_member(member)
    training = _Training(cfg, train, device, bf16, model, optimizer, folder, info)
    if checkpoint.checkpoint_exists(training.folder, TRAIN_CHECKPOINT):
        _resume(training, batching)
    return training


def _resume(training: _Training, batching: dict[str, Any]) -> None:
    """Load the training checkpoint into ``training``: weights, optimiser, step, state."""
    folder, device = training.folder, training.device
    ckpt = checkpoint.load_checkpoint(folder, TRAIN_CHECKPOINT, map_location=device)
    # the dropout rate, beside the batching: another rate would not continue the same run
    # (a checkpoint from before the key trained without dropout)
    batching = {**batching, "dropout": training.info["dropout"]}
    before = {**ckpt.info.get("batching", batching), "dropout": ckpt.info.get("dropout", 0.0)}
    changed = [k for k in batching if before.get(k) != batching[k]]
    if changed and int(ckpt.info["step"]) < training.cfg.mdrnn.steps:
        k = changed[0]
        raise WmlabError(f"the M checkpoint in {folder} was made with {k} = {before.get(k)}"
                         f", now {batching[k]}: resuming would not continue the same run; "
                         f"use the same value or delete {folder} to start again")
    checkpoint.load_weights_into(training.model, ckpt.weights, f"{folder}/{TRAIN_CHECKPOINT}")
    training.optimizer.load_state_dict(ckpt.state["optimizer"])
    training.step = int(ckpt.info["step"])
    if "h" in ckpt.state:
        training.carried = (ckpt.state["h"].to(device), ckpt.state["c"].to(device))


def member_config(cfg: Config, member: int) -> Config:
    """The config member ``member`` of M's ensemble trains with: the run's seed + member
    (its initial weights, batch order and z noise); member 0 is the run's M itself."""
    if member == 0:
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run,
                                                             seed=cfg.run.seed + member))


def train_mdrnn(cfg: Config, *, progress: bool = True, stop_after_steps: int | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                series: SeriesSet | tuple[list[Series], list[Series]] | None = None,
                member: int = 0) -> MdrnnTrainResult:
    """Train M (resuming from the run's checkpoint if there is one); ``member`` k > 0 trains
    the k-th other M of the ensemble (``mdrnn.ensemble``) in its own folder."""
    m = cfg.mdrnn
    if not 0 <= member < m.ensemble:
        raise WmlabError(f"M's ensemble has {m.ensemble} members (mdrnn.ensemble), no member "
                         f"{member}")
    data = _series_set(cfg, series)
    check_series(cfg, data)
    device = resolve_device(cfg.run.device)
    keep_freed_memory(device.type)  # the same large tensors every step: no page faults
    training = _start_training(member_config(cfg, member), data, device, member)
    resumed_from = training.step
    if member == 0:  # where dreams start: one store, whichever Ms step them
        write_initial_z(cfg, data.train)
    logger = MetricsLogger(training.folder, resume_step=training.step)
    result = MdrnnTrainResult(folder=training.folder, steps=training.step,
                              resumed_from=training.step)
    from tqdm.auto import tqdm

    bar = tqdm(total=m.steps, initial=training.step,
               desc="train M" if m.ensemble == 1 else f"train M {member + 1}/{m.ensemble}",
               unit="batch",
               disable=not progress, dynamic_ncols=True)
    backward = BatchBackward(batch_parts(m.batch_parts, device, m.batch_size, m.regime))
    throughput = _Throughput(time.monotonic())
    try:
        while training.step < m.steps:
            batch, state_in = training.next_batch()
            parts = training.learn(batch, state_in, backward)
            throughput.add(m.batch_size, int(batch.mask.sum()))
            bar.update(1)
            parts.update(precision_recall(parts))
            if on_step is not None:
                on_step(training.step, parts)
            _record_step(training, parts, data.val, logger, bar, throughput, result)
            if training.step % m.checkpoint_every == 0 or training.step == m.steps:
                training.save()
            if stop_after_steps is not None and training.step >= stop_after_steps:
                training.save()
                break
        if training.step >= m.steps:
            checkpoint.save_checkpoint(training.folder, FINAL_WEIGHTS, training.step,
                                       training.model.state_dict(), None, training.info)
    finally:
        backward.close()
        bar.close()
        logger.close()
    result.steps, result.resumed_from = training.step, resumed_from
    result.finished = training.step >= m.steps
    result.sequences_per_second, result.steps_per_second = throughput.rates()
    return result


def train_ensemble(cfg: Config, *, progress: bool = True,
                   series: SeriesSet | tuple[list[Series], list[Series]] | None = None
                   ) -> list[MdrnnTrainResult]:
    """Train every M of the ensemble (``mdrnn.ensemble``; one M without it), one after
    another, each resuming where it stopped; one result per member."""
    data = _series_set(cfg, series)
    return [train_mdrnn(cfg, progress=progress, series=data, member=k)
            for k in range(cfg.mdrnn.ensemble)]


def _record_step(training: _Training, parts: dict[str, Any], val: list[Series],
                 logger: MetricsLogger, bar: Any, throughput: _Throughput,
                 result: MdrnnTrainResult) -> None:
    """Log the training losses every ``LOG_EVERY`` steps and validate every
    ``VALIDATE_EVERY`` (and both at the last step)."""
    step, last = training.step, training.cfg.mdrnn.steps
    if step % LOG_EVERY == 0 or step == last:
        sequences_per_s, steps_per_s = throughput.rates()
        logger.log(step, {**{f"train/{k}": v for k, v in parts.items()},
                          "train/sequences_per_s": sequences_per_s,
                          "train/steps_per_s": steps_per_s,
                          "lr": learning_rate(training.cfg, step)})
        bar.set_postfix(nll=f"{parts['z_nll']:.3f}", refresh=False)
    if val and (step % VALIDATE_EVERY == 0 or step == last):
        metrics = validate(training.model, val, training.cfg, training.device)
        logger.log(step, {f"val/{k}": v for k, v in metrics.items()})
        result.history.append({"step": step, **metrics})


# ---------------------------------------------------------------------------------------------
# What dreams need: the initial latents and M itself


def write_initial_z(cfg: Config, train: list[Series]) -> None:
    """The first-frame (mu, logvar) of up to ``initial_z`` episodes: where dreams start."""
    keep = train[: cfg.mdrnn.initial_z]
    mu = torch.from_numpy(np.stack([s.mu[0] for s in keep]).astype(np.float32))
    logvar = torch.from_numpy(np.stack([s.logvar[0] for s in keep]).astype(np.float32))
    checkpoint.save_checkpoint(RunLayout.of(cfg).memory, INITIAL_Z, len(keep),
                               {"mu": mu, "logvar": logvar}, None, {"episodes": len(keep)})
