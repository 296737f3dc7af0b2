"""The paper's temperature table (SPEC 7): C trained only in M's dream at each tau, scored in
the dream at that tau and in the real game, beside the published numbers.

Everything lives under ``<run>/sweeps/tau/`` and reads the run's V and M (never writes them):

- ``<tau>/``: one controller per temperature, trained by the ordinary CMA-ES stage
  (``es.train_controller`` with that folder): ``es-state.pkl``, weights, ``metrics.csv``,
  ``progress.png``. ``settings.json`` (written before training starts) records what the
  controller is trained with; a sweep asking for a different setting in an existing folder
  is refused, except more generations, which continue the same CMA-ES run.
- ``<tau>/scores.json``: its dream and real scores, with the key they were computed under
  (episodes, seeds, backend, which checkpoint); a score whose key no longer matches is
  computed again, a matching one is reused.
- ``random.json``: the random policy on the same real seeds as the controllers.
- ``table.json``, ``table.md``, ``table.png``: the table, ours beside the paper's.

A killed sweep resumes where it stopped: a tau whose CMA-ES has not reached the generations
resumes from its checkpoint (``run_es`` resumes exactly), finished taus are not trained
again, scores already computed are reused.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from wmlab.config import Config
from wmlab.controller import finished_generations
from wmlab.errors import WmlabError
from wmlab.fsio import atomic_write_bytes, exists
from wmlab.published import PAPER_TAU_TABLE
from wmlab.runs import RunLayout, config_drift

MAX_TAU = 10.0  # dream.tau's range in the config

Log = Callable[[str], None]


def tau_label(tau: float) -> str:
    """The folder name of a temperature: two decimals (0.10, 1.15), more only if needed."""
    text = f"{tau:.2f}"
    return text if float(text) == tau else repr(float(tau))


def check_taus(taus: Sequence[Any]) -> list[float]:
    """Temperatures as floats; bad ones raise a WmlabError naming the fix."""
    if isinstance(taus, (str, bytes)) or len(taus) == 0:
        raise WmlabError("give at least one temperature, e.g. --taus 0.1,0.5,1.0,1.15,1.3 "
                         "(the paper's table)")
    values: list[float] = []
    for tau in taus:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) \
                or not 0 < tau <= MAX_TAU:
            raise WmlabError(f"temperature {tau!r} is not a number in (0, {MAX_TAU:g}]: tau "
                             "scales M's sampling noise, e.g. 0.1 (nearly deterministic) to "
                             "1.3 (the paper's range)")
        value = float(tau)
        if any(tau_label(value) == tau_label(v) for v in values):
            raise WmlabError(f"temperature {value:g} is listed twice: list each tau once")
        values.append(value)
    return values


def check_sweep_name(name: str) -> str:
    """A sweep's folder name: letters, digits, '.', '_' and '-' (it is one folder)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise WmlabError(f"sweep name {name!r} is not a folder name: use letters, digits, "
                         "'.', '_' or '-', e.g. --name tau-no-dropout")
    return name


def parse_taus(text: str) -> list[float]:
    """``"0.1,0.5,1.0"`` -> [0.1, 0.5, 1.0], checked."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    values: list[Any] = []
    for item in items:
        try:
            values.append(float(item))
        except ValueError:
            raise WmlabError(f"--taus: '{item}' is not a number; give comma-separated "
                             "temperatures, e.g. --taus 0.1,0.5,1.0,1.15,1.3") from None
    return check_taus(values)


def _positive_int(name: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WmlabError(f"{name} must be a positive integer, got {value!r} ({hint})")
    return value


def tau_config(cfg: Config, tau: float, generations: int, population: int | None = None,
               rollouts: int | None = None) -> Config:
    """``cfg`` with C trained in the dream at ``tau`` for ``generations``."""
    out = copy.deepcopy(cfg)
    out.es.fitness = "dream"
    out.es.generations = generations
    if population is not None:
        out.es.population = population
    if rollouts is not None:
        out.es.rollouts = rollouts
    out.dream.tau = tau
    return out


def _fingerprint(folder: str, name: str) -> str:
    from wmlab.checkpoint import read_info

    try:
        return str(read_info(folder, name).get("fingerprint", ""))
    except WmlabError:
        return ""


def training_settings(cfg: Config) -> dict[str, Any]:
    """What a tau's controller depends on (not how fast it is computed: engine, workers)."""
    from wmlab.memory.model import FINAL_WEIGHTS, INITIAL_Z

    es, dream, ctrl = cfg.es, cfg.dream, cfg.controller
    return {
        "tau": cfg.dream.tau, "seed": cfg.run.seed, "env": cfg.env.name,
        "population": es.population, "rollouts": es.rollouts, "sigma0": es.sigma0,
        "l2": es.l2, "antithetic": es.antithetic, "eval_every": es.eval_every,
        "eval_rollouts": es.eval_rollouts, "dream_max_steps": dream.max_steps,
        "dream_precision": dream.precision, "dream_done": dream.done,
        "done_weight": cfg.mdrnn.done_weight, "controller_inputs": ctrl.inputs,
        "controller_hidden": ctrl.hidden, "controller_bias": ctrl.bias,
        "memory": _fingerprint(RunLayout.of(cfg).memory, FINAL_WEIGHTS),
        "initial_z": _fingerprint(RunLayout.of(cfg).memory, INITIAL_Z),
        "generations": es.generations,
        # only when on: folders swept before the keys existed keep matching
        **({"controller_lookahead": True} if ctrl.lookahead else {}),
        **({"dream_dropout": True} if dream.dropout else {}),
        **({"ensemble": [_fingerprint(folder, FINAL_WEIGHTS) for folder in
                         RunLayout.of(cfg).memory_members(cfg.mdrnn.ensemble)[1:]]}
           if cfg.mdrnn.ensemble > 1 else {}),
    }


DREAM_SECTIONS = ("env", "controller", "dream", "mdrnn")  # what the dream and C depend on


def _sweep_drift(cfg: Config) -> list[str]:
    """Settings the dream and C depend on where ``cfg`` differs from the run's config.toml;
    tau is left out (the sweep varies it), and of M's keys all but the done weight (M's weights
    come from the checkpoint, whatever made them)."""
    def ignored(section: str, key: str) -> bool:
        return key == "tau" or (section == "mdrnn" and key != "done_weight")

    return config_drift(cfg, DREAM_SECTIONS, "sweep", ignored)


def _read_json(path: str) -> Any:
    import fsspec

    if not exists(path):
        return None
    with fsspec.open(path, "rb") as handle:
        try:
            return json.load(handle)
        except ValueError:
            raise WmlabError(f"{path} is damaged (not JSON): delete it and run the sweep "
                             "again") from None


def _write_json(path: str, data: Any) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2).encode())


def check_folder(folder: str, wanted: dict[str, Any]) -> None:
    """Refuse a folder trained with other settings (nothing is written here)."""
    recorded = _read_json(f"{folder}/settings.json")
    done = finished_generations(folder)
    if recorded is None:
        if done:
            raise WmlabError(f"{folder} holds a CMA-ES run but no settings.json (not made by "
                             "sweep-tau): delete it or choose another --run")
        return
    changed = [key for key in wanted if key != "generations" and recorded.get(key) != wanted[key]]
    if changed:
        diffs = ", ".join(f"{key} {recorded.get(key)!r} -> {wanted[key]!r}" for key in changed)
        raise WmlabError(f"{folder} was trained with other settings ({diffs}): run the sweep "
                         "with the recorded settings, or delete that folder to train this "
                         "tau again")
    if done > wanted["generations"]:
        raise WmlabError(f"{folder} already has {done} generations, more than the "
                         f"{wanted['generations']} asked: pass --generations {done} or more "
                         "(or delete that folder to train again)")


def _score_key(cfg: Config, folder: str, episodes: int, dream_episodes: int) -> dict[str, Any]:
    from wmlab.controller.cmaes import load_controller_params
    from wmlab.evaluate import scored_env

    _, info = load_controller_params(folder)
    _, backend = scored_env(cfg)
    return {"controller": info["source"], "fingerprint": info.get("fingerprint", ""),
            "generation": info.get("generation"), "episodes": episodes,
            "dream_episodes": dream_episodes, "first_seed": cfg.eval.seed,
            "backend": backend, "env_max_steps": cfg.env.max_steps}


def _random_key(cfg: Config, episodes: int) -> dict[str, Any]:
    from wmlab.evaluate import scored_env

    _, backend = scored_env(cfg)
    return {"episodes": episodes, "first_seed": cfg.eval.seed, "backend": backend,
            "env_max_steps": cfg.env.max_steps}


def _run_random_policy(cfg: Config, key: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The random policy's episodes from the run's evaluate stage, if they are exactly the
    ones the sweep would play (same seeds in the same order, backend and step cap)."""
    from wmlab.evaluate import episode_rows

    path = RunLayout.of(cfg).scores("random", key["backend"])
    stored = _read_json(path)
    if not isinstance(stored, dict):
        return None
    seeds = [int(s) for s in episode_rows(key["first_seed"], key["episodes"]).ravel()]
    extra = stored.get("extra") or {}
    same = (stored.get("seeds") == seeds and stored.get("backend") == key["backend"]
            and stored.get("where") == "real" and extra.get("policy") == "uniform"
            and extra.get("max_steps") == key["env_max_steps"])
    return (path, stored) if same else None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result[key] for key in ("mean", "std", "episodes", "backend", "where")}


def _metrics_seconds(folder: str) -> float | None:
    """Mean seconds per generation over the folder's metrics.csv (None without rows)."""
    import fsspec

    path = f"{folder}/metrics.csv"
    if not exists(path):
        return None
    with fsspec.open(path, "r") as handle:
        values = [float(row["seconds"]) for row in csv.DictReader(handle)
                  if row.get("seconds") not in (None, "")]
    return sum(values) / len(values) if values else None


def tau_sweep(cfg: Config, taus: Sequence[float], *, generations: int,
              population: int | None = None, rollouts: int | None = None,
              episodes: int | None = None, dream_episodes: int = 256,
              progress: bool = True, log: Log | None = None,
              name: str = "tau") -> dict[str, Any]:
    """Train and score C at each tau on the run's V and M; write the table. Returns it.

    ``name`` is the sweep's folder under ``<run>/sweeps/``: another name than ``tau`` keeps
    a variant (``--set dream.dropout=false``, another done rule) beside the main table.

    ``episodes`` real episodes (default eval.episodes) on the fixed eval seeds and reference
    backend, ``dream_episodes`` dreams at the controller's own tau; the random policy on the
    same real seeds once.
    """
    from wmlab.agent import workload_from_config
    from wmlab.controller.cmaes import check_es_config
    from wmlab.evaluate import evaluate_controller, evaluate_random_policy
    from wmlab.pipeline.controller_stage import check_training_inputs, train_controller

    say = log or (lambda _: None)
    values = check_taus(list(taus))
    generations = _positive_int("generations", generations,
                                "CMA-ES generations per tau, e.g. 10")
    episodes = _positive_int("episodes", cfg.eval.episodes if episodes is None else episodes,
                             "the paper scores 100 real episodes")
    dream_episodes = _positive_int("dream_episodes", dream_episodes,
                                   "dreams scored per tau, e.g. 256")
    for option, value in (("population", population), ("rollouts", rollouts)):
        if value is not None:
            _positive_int(option, value, "the paper uses 64 members x 16 rollouts")
    root = RunLayout.of(cfg).sweep(check_sweep_name(name))
    configs = [tau_config(cfg, tau, generations, population, rollouts) for tau in values]
    # Every input is checked before anything is trained or written.
    check_es_config(configs[0].es)
    check_training_inputs(configs[0])
    if configs[0].dream.calibration_tolerance > 0:
        from wmlab.calibrate import check_dream_calibration

        check_dream_calibration(configs[0])  # the gate train_controller applies, before any tau
    workload_from_config(configs[0], "real").load()  # V too: the real scores need it
    for line in _sweep_drift(cfg):
        say(f"warning: differs from the run's config.toml: {line} (pass --set to match)")
    wanted = [training_settings(c) for c in configs]
    for tau, settings in zip(values, wanted, strict=True):
        check_folder(f"{root}/{tau_label(tau)}", settings)

    rows = []
    for tau, tcfg, settings in zip(values, configs, wanted, strict=True):
        folder = f"{root}/{tau_label(tau)}"
        rows.append(_train_and_score(tcfg, folder, settings, episodes, dream_episodes,
                                     progress, say, train_controller, evaluate_controller))

    random_path = f"{root}/random.json"
    key = _random_key(cfg, episodes)
    stored = _read_json(random_path)
    if stored is not None and stored.get("key") == key:
        random_result = stored["result"]
        say(f"random policy: reusing {random_path}")
    elif (from_run := _run_random_policy(cfg, key)) is not None:
        # the run's evaluate stage already played it on these seeds: on CarRacing's Gymnasium
        # backend that saves ~15 minutes of 2 cores for 100 episodes
        path, random_result = from_run
        say(f"random policy: reusing the run's {path} (same seeds, backend and cap)")
        _write_json(random_path, {"key": key, "result": random_result})
    else:
        say(f"random policy: {episodes} real episodes on the same seeds")
        result = evaluate_random_policy(cfg, episodes=episodes,
                                        out=f"{root}/random-{key['backend']}.json")
        random_result = asdict(result)
        _write_json(random_path, {"key": key, "result": random_result})

    table = _table(cfg, configs[0], rows, random_result, generations, episodes, dream_episodes)
    _write_json(f"{root}/table.json", table)
    atomic_write_bytes(f"{root}/table.md", table_markdown(table).encode())
    atomic_write_bytes(f"{root}/table.png", table_plot(table))
    say(f"table: {root}/table.md, table.json, table.png")
    return table


def _train_and_score(cfg: Config, folder: str, settings: dict[str, Any], episodes: int,
                     dream_episodes: int, progress: bool, say: Log, train: Callable[..., Any],
                     evaluate: Callable[..., Any]) -> dict[str, Any]:
    tau = cfg.dream.tau
    # The settings go first: a folder with a checkpoint always says what made it.
    _write_json(f"{folder}/settings.json", settings)
    done = finished_generations(folder)
    if done >= cfg.es.generations:
        say(f"tau {tau_label(tau)}: trained ({done} generations), not training again")
    else:
        say(f"tau {tau_label(tau)}: CMA-ES in the dream, generations {done + 1}.."
            f"{cfg.es.generations} of {cfg.es.population} x {cfg.es.rollouts} dreams")
        train(cfg, progress=progress, folder=folder)
    key = _score_key(cfg, folder, episodes, dream_episodes)
    stored = _read_json(f"{folder}/scores.json")
    if stored is not None and stored.get("key") == key:
        say(f"tau {tau_label(tau)}: reusing scores")
        dream, real = stored["dream"], stored["real"]
    else:
        say(f"tau {tau_label(tau)}: scoring {dream_episodes} dreams and {episodes} real "
            "episodes")
        dream = asdict(evaluate(cfg, episodes=dream_episodes, where="dream",
                                out=f"{folder}/eval-dream.json", controller_folder=folder))
        real = asdict(evaluate(cfg, episodes=episodes, where="real",
                               out=f"{folder}/eval-real.json", controller_folder=folder))
        _write_json(f"{folder}/scores.json", {"key": key, "dream": dream, "real": real})
    paper = PAPER_TAU_TABLE.get(round(tau, 2)) if tau_label(tau) == f"{tau:.2f}" else None
    return {"tau": tau, "folder": folder, "generations": finished_generations(folder),
            "controller": key["controller"], "controller_generation": key["generation"],
            "seconds_per_generation": _metrics_seconds(folder),
            "dream": _summary(dream), "real": _summary(real),
            "dream_seeds": [dream["seeds"][0], dream["seeds"][-1]], "real_seeds": real["seeds"],
            "paper": None if paper is None else
            {"dream": list(paper["dream"]), "real": list(paper["real"])}}


def _table(cfg: Config, tcfg: Config, rows: list[dict[str, Any]], random_result: dict[str, Any],
           generations: int, episodes: int, dream_episodes: int) -> dict[str, Any]:
    return {
        "run": cfg.run_dir(), "env": cfg.env.name,
        "settings": {"generations": generations, "population": tcfg.es.population,
                     "rollouts": tcfg.es.rollouts, "eval_rollouts": tcfg.es.eval_rollouts,
                     "episodes": episodes, "dream_episodes": dream_episodes,
                     "dream_max_steps": tcfg.dream.max_steps, "dream_done": tcfg.dream.done,
                     "dream_dropout": tcfg.dream.dropout,
                     "first_seed": cfg.eval.seed, "backend": random_result["backend"]},
        "rows": rows,
        "random": {**_summary(random_result), "seeds": random_result["seeds"]},
        "paper_note": "SPEC section 7 (World Models, DoomTakeCover): C trained only in the "
                      "dream, 100 real episodes",
    }


def _pm(pair: Any) -> str:
    if pair is None:
        return "-"
    if isinstance(pair, dict):
        pair = (pair["mean"], pair["std"])
    return f"{pair[0]:.0f} +- {pair[1]:.0f}"


def table_markdown(table: dict[str, Any]) -> str:
    s = table["settings"]
    lines = [
        "# Temperature sweep: C trained only in M's dream at each tau",
        "",
        f"Run `{table['run']}` ({table['env']}). Each controller: CMA-ES for "
        f"{s['generations']} generations of {s['population']} members x {s['rollouts']} "
        f"dreams (the paper: 64 x 16, 934 generations for its Doom C), the mean scored on "
        f"{s['eval_rollouts']} dreams. Dream score: {s['dream_episodes']} dreams at the "
        f"controller's tau (cap {s['dream_max_steps']} steps, end: {s['dream_done']}"
        f"{', M dropout on' if s.get('dream_dropout') else ''}). "
        f"Real score: {s['episodes']} episodes ({s['backend']}), seeds {s['first_seed']}.."
        f"{s['first_seed'] + s['episodes'] - 1}, the same for every row. Mean +- std.",
        "",
        "| tau | dream score (ours) | real score (ours) | paper virtual | paper actual |",
        "|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        paper = row["paper"] or {}
        lines.append(f"| {tau_label(row['tau'])} | {_pm(row['dream'])} | {_pm(row['real'])} "
                     f"| {_pm(paper.get('dream'))} | {_pm(paper.get('real'))} |")
    lines.append(f"| random policy | - | {_pm(table['random'])} | - | - |")
    lines += ["", f"Paper: {table['paper_note']}.", ""]
    return "\n".join(lines)


def table_plot(table: dict[str, Any]) -> bytes:
    """Dream and real score per tau, ours and the paper's, and the random policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wmlab.plots import pyplot_png

    rows = sorted(table["rows"], key=lambda r: r["tau"])
    taus = [r["tau"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for where, color in (("dream", "tab:blue"), ("real", "tab:red")):
        ax.errorbar(taus, [r[where]["mean"] for r in rows], [r[where]["std"] for r in rows],
                    fmt="o-", color=color, capsize=3, label=f"{where} score (ours)")
        paper = [(r["tau"], r["paper"][where]) for r in rows if r["paper"]]
        if paper:
            ax.plot([p[0] for p in paper], [p[1][0] for p in paper], "s--", color=color,
                    alpha=0.5, label=f"{where} score (paper)")
    random = table["random"]
    ax.axhline(random["mean"], color="gray", linestyle=":",
               label=f"random policy, real ({random['mean']:.0f})")
    ax.set_xlabel("temperature tau")
    ax.set_ylabel("return (steps survived)")
    ax.set_title(f"C trained in the dream, {table['settings']['generations']} generations")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return pyplot_png(fig)
