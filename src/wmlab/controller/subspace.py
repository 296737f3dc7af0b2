"""Where CMA-ES searches a linear C's weights, when not weight by weight: only along the
directions in which M's hidden state varies (``es.h_components``), or in units of each
input's spread (``es.standardize``). Either way each searched point maps to the same linear
C, saved whole: evaluation, shipping and the agent do not know how it was searched.

A linear C = tanh(W [z, h] + b) on CarRacing has 867 weights, 768 of them on the 256 units
of h; along a driving agent's episodes h lies mostly in a few directions (16 of them hold
87% of its variance). CMA-ES with 32 members progresses roughly in proportion to 1 / the
number of parameters it searches, and a move of W along a direction h never takes changes
nothing C does. So the search can move W's h-columns within the span of h's top k principal
directions P (k x H) only: W_h = A P with A (outputs x k) searched, the weights on z (and on
a clock) and the biases searched as they are. The controller it produces is the same linear
C, saved whole: evaluation, shipping and the agent do not know the search was smaller.

The starting controller's W_h is projected on P (A = W_h P^T), and what the projection
drops, (W_h - A P), is folded into the bias at h's mean, so the start acts as before where
h sits at its mean and differs only by what h's dropped directions carried.

P and h's mean come from M run over the iteration's recorded episodes (the agent's where
there are any, as ``es.carry_over`` uses them) and are kept in ``<controller>/h-basis``, so
a resumed search maps its parameters as it did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from wmlab.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from wmlab.controller.carry_over import memory_features_of
from wmlab.controller.model import ControllerShape
from wmlab.data.series import Series
from wmlab.errors import WmlabError
from wmlab.memory.model import MDNRNN

BASIS = "h-basis"
SCALE = "input-scale"
BASIS_ROWS = 200_000  # recorded steps the principal directions are fitted on, at most
SCALE_ROWS = 50_000  # and the inputs' means and spreads (they settle within tens of episodes)
# es.standardize: an input whose spread is below this fraction of the median input's is
# scaled as if it were this wide. Under controller.z_noise = 0 V's unused dimensions barely
# move (CarRacing: a spread of ~0.02 against 0.4-0.6 for the used ones); scaled to unit spread
# they would take as large a share of every step as an input that carries the road.
SPREAD_FLOOR = 0.25


@dataclass(frozen=True)
class HSubspace:
    """The map from the searched parameters to a linear C's whole parameter vector.

    ``basis`` (k, H): orthonormal rows, h's principal directions; ``mean`` (H,): h's mean;
    h sits at inputs ``h_start`` .. ``h_start + H`` of C's features ([z, h], then a clock).
    """

    shape: ControllerShape
    h_start: int
    basis: np.ndarray
    mean: np.ndarray

    @property
    def components(self) -> int:
        return len(self.basis)

    @property
    def _h_columns(self) -> slice:
        return slice(self.h_start, self.h_start + self.basis.shape[1])

    @property
    def _other_columns(self) -> np.ndarray:
        keep = np.ones(self.shape.inputs, dtype=bool)
        keep[self._h_columns] = False
        return np.flatnonzero(keep)

    @property
    def size(self) -> int:
        """How many parameters the search moves."""
        shape = self.shape
        searched_inputs = shape.inputs - self.basis.shape[1] + self.components
        return shape.outputs * searched_inputs + (shape.outputs if shape.bias else 0)

    def full(self, searched: np.ndarray) -> np.ndarray:
        """(P, size) searched parameters -> (P, num_params) controllers: [W, b] rows."""
        searched = np.atleast_2d(np.asarray(searched, dtype=np.float64))
        shape, k = self.shape, self.components
        others = len(self._other_columns)
        w_other = searched[:, :shape.outputs * others].reshape(-1, shape.outputs, others)
        end = shape.outputs * (others + k)
        a = searched[:, shape.outputs * others:end].reshape(-1, shape.outputs, k)
        w = np.empty((len(searched), shape.outputs, shape.inputs))
        w[:, :, self._other_columns] = w_other
        w[:, :, self._h_columns] = a @ self.basis
        return np.concatenate([w.reshape(len(searched), -1), searched[:, end:]], axis=1)

    def coordinates(self, params: np.ndarray) -> np.ndarray:
        """A whole controller (num_params,) -> the searched parameters closest to it: W_h
        projected on the basis, what it drops folded into the bias at h's mean."""
        shape = self.shape
        params = np.asarray(params, dtype=np.float64)
        w = params[:shape.outputs * shape.inputs].reshape(shape.outputs, shape.inputs)
        w_h = w[:, self._h_columns]
        a = w_h @ self.basis.T
        parts = [w[:, self._other_columns].ravel(), a.ravel()]
        if shape.bias:
            bias = params[shape.outputs * shape.inputs:]
            parts.append(bias + (w_h - a @ self.basis) @ self.mean)
        return np.concatenate(parts)


def check_h_subspace(shape: ControllerShape, inputs: str, components: int,
                     m_hidden: int) -> None:
    """es.h_components fits a linear C that reads [z, h], with k at most h's size."""
    if shape.hidden or shape.lookahead or inputs != "zh":
        this = "a look-ahead C" if shape.lookahead else \
            "one with a hidden layer" if shape.hidden else f"on {inputs}"
        raise WmlabError("es.h_components searches a linear controller's weights on [z, h], "
                         f"and this one is {this}: set controller.inputs = 'zh', "
                         "controller.hidden = 0 and controller.lookahead = false, or "
                         "es.h_components = 0")
    if components > m_hidden:
        raise WmlabError(f"es.h_components is {components}, but M's state has {m_hidden} "
                         f"units: set it to at most {m_hidden}, or 0 to search every weight")


@torch.no_grad()
def fit_h_subspace(shape: ControllerShape, components: int, m: MDNRNN,
                   episodes: Iterable[Series], z_dim: int) -> HSubspace:
    """h's top ``components`` principal directions over the episodes' steps (M run over
    them as the agent runs it, many episodes at once; at most BASIS_ROWS steps, the first
    episodes' first)."""
    taken = _first_episodes(episodes, BASIS_ROWS)
    hidden = [features[:, z_dim:z_dim + m.shape.hidden]
              for features in memory_features_of(m.eval(), taken, "zh")]
    count = min(sum(len(h) for h in hidden), BASIS_ROWS)
    if count <= components:
        raise WmlabError(f"es.h_components needs more recorded steps than its {components} "
                         f"directions, and the episodes hold {count}: collect episodes in "
                         "this iteration, or set es.h_components = 0")
    basis, mean = principal_directions(np.concatenate(hidden)[:BASIS_ROWS], components)
    return HSubspace(shape, z_dim, basis, mean)


def _first_episodes(episodes: Iterable[Series], steps: int) -> list[Series]:
    """The first episodes, up to the one that brings their steps to ``steps``."""
    taken: list[Series] = []
    count = 0
    for series in episodes:
        taken.append(series)
        count += len(series.actions)
        if count >= steps:
            break
    return taken


def principal_directions(states: np.ndarray, components: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(N, H) states -> their top ``components`` principal directions (k, H), orthonormal
    rows, the largest variance first, and their mean (H,)."""
    states = np.asarray(states, dtype=np.float64)
    mean = states.mean(axis=0)
    _, _, directions = np.linalg.svd(states - mean, full_matrices=False)
    return directions[:components], mean


def h_subspace(folder: str, shape: ControllerShape, components: int, m: MDNRNN,
               episodes: Callable[[], Iterable[Series]], z_dim: int) -> HSubspace:
    """The run's subspace: read back from ``folder`` where a search made one before with
    the same number of directions, else fitted on ``episodes()`` and saved there."""
    if checkpoint_exists(folder, BASIS):
        saved = load_checkpoint(folder, BASIS, with_state=False).weights
        if len(saved["basis"]) == components:
            return HSubspace(shape, z_dim, saved["basis"].double().numpy(),
                             saved["mean"].double().numpy())
    space = fit_h_subspace(shape, components, m, episodes(), z_dim)
    save_checkpoint(folder, BASIS, 0, {"basis": torch.from_numpy(space.basis),
                                       "mean": torch.from_numpy(space.mean)}, None,
                    {"components": components})
    return space


@dataclass(frozen=True)
class ScaledInputs:
    """es.standardize: CMA-ES searches a linear C on standardised inputs, C(x) = A (x - mean)
    / scale + a, and each point [A, a] stands for the plain linear C with W = A / scale and
    b = a - W mean. An isotropic step then moves C's response to every input by as much,
    whatever that input's spread; the bias is the action at the inputs' mean.

    ``mean``, ``scale`` (inputs,): over the iteration's recorded episodes, as C sees them;
    ``scale`` each input's spread relative to the inputs' root mean square spread.
    """

    shape: ControllerShape
    mean: np.ndarray
    scale: np.ndarray

    @property
    def size(self) -> int:
        return self.shape.num_params

    def full(self, searched: np.ndarray) -> np.ndarray:
        """(P, size) searched parameters -> (P, num_params) controllers: [W, b] rows."""
        searched = np.atleast_2d(np.asarray(searched, dtype=np.float64))
        outputs, inputs = self.shape.outputs, self.shape.inputs
        w = searched[:, :outputs * inputs].reshape(-1, outputs, inputs) / self.scale
        bias = searched[:, outputs * inputs:] - w @ self.mean
        return np.concatenate([w.reshape(len(searched), -1), bias], axis=1)

    def coordinates(self, params: np.ndarray) -> np.ndarray:
        """A whole controller (num_params,) -> its searched parameters (exactly)."""
        outputs, inputs = self.shape.outputs, self.shape.inputs
        params = np.asarray(params, dtype=np.float64)
        w = params[:outputs * inputs].reshape(outputs, inputs)
        return np.concatenate([(w * self.scale).ravel(),
                               params[outputs * inputs:] + w @ self.mean])


def check_scaled_inputs(shape: ControllerShape, h_components: int) -> None:
    """es.standardize searches a linear C with a bias, on inputs it reads directly."""
    if shape.hidden or shape.lookahead or not shape.bias:
        this = "a look-ahead C" if shape.lookahead else \
            "one with a hidden layer" if shape.hidden else "one without a bias"
        raise WmlabError("es.standardize searches a linear controller's weights in units of "
                         f"its inputs' spread, and this one is {this}: set "
                         "controller.hidden = 0 and controller.lookahead = false, or "
                         "es.standardize = false")
    if h_components:
        raise WmlabError("es.standardize and es.h_components each choose where CMA-ES "
                         "searches C's weights: set one of them only (es.h_components = 0 "
                         "or es.standardize = false)")


def input_spread(features: np.ndarray, posterior_variance: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(N, inputs) features as C reads them with z at V's mean, and (N, z) the variance the
    agent's z noise adds to each of the first z inputs -> the inputs' mean and the scale
    ``ScaledInputs`` divides by: each input's spread (standard deviation, the noise
    included; at least SPREAD_FLOOR of the median input's) over the inputs' root mean
    square spread. Dividing by the ratio rather than the spread itself keeps es.sigma0's
    meaning: a step moves C's output as much in all as the same step on the raw inputs,
    shared alike among the inputs instead of in proportion to their spreads."""
    features = np.asarray(features, dtype=np.float64)
    variance = features.var(axis=0)
    z_dim = posterior_variance.shape[1]
    variance[:z_dim] += np.asarray(posterior_variance, dtype=np.float64).mean(axis=0)
    spread = np.sqrt(variance)
    spread = np.maximum(spread, SPREAD_FLOOR * np.median(spread))
    return features.mean(axis=0), spread / np.sqrt(np.mean(spread ** 2))


@torch.no_grad()
def fit_scaled_inputs(shape: ControllerShape, m: MDNRNN, episodes: Iterable[Series],
                      inputs: str, clock: tuple[int, ...], z_noise: float) -> ScaledInputs:
    """The inputs' mean and scale over the episodes' steps (M run over them as the agent
    runs it, many episodes at once; at most SCALE_ROWS steps, the first episodes'); z as the
    agent draws it, V's mean plus ``z_noise`` times its posterior noise."""
    taken = _first_episodes(episodes, SCALE_ROWS)
    count = sum(len(series.actions) for series in taken)
    if count < 2:
        raise WmlabError(f"es.standardize measures C's inputs over recorded steps, and the "
                         f"episodes hold {count}: collect episodes in this iteration, or "
                         "set es.standardize = false")
    features = np.concatenate(memory_features_of(m.eval(), taken, inputs, clock))
    if inputs == "z":  # memory_features gives [z, h, clock]; C on z reads no h
        z_dim = m.shape.z_dim
        features = np.delete(features, np.s_[z_dim:z_dim + m.shape.hidden], axis=1)
    logvar = np.concatenate([series.logvar[:-1] for series in taken]).astype(np.float64)
    noise = z_noise ** 2 * np.exp(logvar)
    mean, scale = input_spread(features, noise)
    return ScaledInputs(shape, mean, scale)


def scaled_inputs(folder: str, shape: ControllerShape, m: MDNRNN,
                  episodes: Callable[[], Iterable[Series]], inputs: str,
                  clock: tuple[int, ...], z_noise: float) -> ScaledInputs:
    """The run's input scaling: read back from ``folder`` where a search made one before,
    else measured on ``episodes()`` and saved there."""
    if checkpoint_exists(folder, SCALE):
        saved = load_checkpoint(folder, SCALE, with_state=False).weights
        return ScaledInputs(shape, saved["mean"].double().numpy(),
                            saved["scale"].double().numpy())
    space = fit_scaled_inputs(shape, m, episodes(), inputs, clock, z_noise)
    save_checkpoint(folder, SCALE, 0, {"mean": torch.from_numpy(space.mean),
                                       "scale": torch.from_numpy(space.scale)}, None,
                    {"inputs": shape.inputs, "spread_floor": SPREAD_FLOOR})
    return space
