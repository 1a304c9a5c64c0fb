"""The per-layer reducer chain: pool → (row-centre) → sketch → L2 normalise → projection.

Pooling: feature maps (C, H, W) are flattened (the default), averaged or maxed over space,
or averaged on a K×K grid (``grid:K``); token outputs (tokens, C) are flattened
(``tokens``, the same as ``flatten``), reduced to the class token (``cls``), or averaged over
the patch tokens (``mean``, leaving out the class and register tokens the model declares).

The first stages run inside the forward hook on the model's device, so the raw
activation is dropped as soon as it is reduced. The projection is fitted on a seeded
training sample and persisted as a FAISS ``LinearTransform`` (``transform.faiss``); the
sketch is regenerated from its seed.

Why the default projection is *uncentred*: the similarity vecsim preserves is the cosine
of the raw activation vectors. The top right singular vectors of the (uncentred)
training matrix keep the inner products among the training vectors exactly when all of
them are kept, and best in the least-squares sense otherwise. Centred PCA (``center``)
preserves distances to the mean instead, which is a different quantity.

Why the vector is normalised *before* the projection and not after: the inner product of
two stored vectors ``P x̂ · P ŷ`` is then the best rank-k estimate of ``cos(x, y)`` (the
projection is fitted on unit vectors, so it is the Eckart–Young approximation of the
training cosine matrix), and it is exact for any vector against a training vector when the
projection is exact. Renormalising after the projection would divide by ``‖P x̂‖``, a
per-stimulus factor that inflates the cosines of the stimuli the projection keeps least
of; on DenseNet121's transition layers it cost 0.05–0.1 in Spearman. A stored vector's
norm is therefore ≤ 1: the share of its (unit) activation the projection keeps, 1 when
the projection is exact. (With ``center`` the vector is renormalised after the
projection: the cosine after centred PCA is the quantity that option asks for.)

Why the training stimuli's own vectors are shrunk (when the projection keeps fewer
directions than the training sample has): the projection is built from those stimuli, so
each one's idiosyncratic part (what it shares with no other stimulus) lies partly inside
the kept directions and inflates the inner products among training stimuli; a stimulus the
projection never saw has no such part in them (the in-sample inflation of principal
component scores; Lee, Zou & Wright, Ann. Statist. 2010). Fitting ``P x̂ᵢ · D² P x̂ⱼ`` to the
training cosines off the diagonal with ``D² = I − δΛ⁻¹`` has a closed-form least-squares δ
(:func:`in_sample_noise`: the inflation each kept eigenvalue carries; 0 when the projection
is exact), and the training vectors are stored as ``D P x̂`` (:meth:`LayerReducer.project_training`),
every other stimulus and query as ``P x̂``. On 300 stimuli of DenseNet121's transition1 at
400×400 with dim 256, Spearman of the training pairs went from 0.986 to 0.9997 (exact
activations) and from 0.950 to 0.964 (after a 16,384-bucket sketch); pairs of a training and
another stimulus move by less, either way (0.9939 → 0.9900 with 200 trained at dim 180,
benchmarks/bench_offdiagonal_fit.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vecsim.errors import ConfigError, DimensionMismatchError
from vecsim._io import fsync_replace, save_array

SIMILARITIES = ("cosine", "correlation")
POOLINGS = ("flatten", "avg", "max")  # plus "grid:K", for (C, H, W) feature maps
TOKEN_POOLINGS = ("tokens", "cls", "mean")  # for (tokens, C) outputs
SKETCH_THRESHOLD = 65_536  # layers with more units than this are sketched unless sketch_dim == 0
# The automatic sketch: the smallest power of two from SKETCH_MIN with at most UNITS_PER_BUCKET
# units per bucket, capped at SKETCH_MAX (transition1/2/3 of DenseNet121 at 400 px: 131,072 /
# 65,536 / 32,768). The sketch's error on a cosine falls as 1/√m whatever the layer's size, and
# on concentrated cosines (0.72 ± 0.013 on transition1 in bench_huge_layers) 16,384 buckets
# give Spearman 0.964 there, 131,072 give 0.995; the cost, m half-precision floats per
# training stimulus while fitting and 4·dim·m bytes of transform, stays below a twentieth of
# the raw layer's.
SKETCH_MIN = 16_384
SKETCH_MAX = 131_072
UNITS_PER_BUCKET = 20
GRAM_BLOCK = 16_384


@dataclass(frozen=True)
class ReducerConfig:
    """Everything that defines one layer's reduction (recorded in the manifest)."""

    similarity: str = "cosine"
    center: bool = False
    dim: int | None = 256  # None: 'auto', keep ``energy`` of the second-moment energy
    max_dim: int = 512
    energy: float = 0.99
    sketch_dim: int | None = None  # None: automatic; 0: never
    sketch_seed: int = 0
    pooling: str = "flatten"
    drop_zero_units: bool = False
    # the model's token layout, for the token poolings: class and register tokens before the
    # patch tokens ('mean' leaves them out), and whether the first is a class token ('cls')
    prefix_tokens: int = 0
    class_token: bool = False

    @property
    def renormalises(self) -> bool:
        """Whether the chain renormalises after the projection: centred PCA, whose cosine after
        centring is the quantity asked for (the uncentred chain keeps norms <= 1)."""
        return self.center

    def validate(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"unknown similarity {self.similarity!r}; choose cosine or correlation")
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"dim must be at least 1, not {self.dim}")
        if not 0 < self.energy <= 1:
            raise ConfigError(f"energy must be in (0, 1], not {self.energy}")
        if self.sketch_dim is not None and self.sketch_dim < 0:
            raise ConfigError("sketch dim must be 0 (off) or positive")
        if self.drop_zero_units and self.similarity != "cosine":
            raise ConfigError("--drop-zero-units needs --similarity cosine (a unit's mean would change the others)")
        pooling_grid(self.pooling)


def pooling_grid(pooling: str) -> int | None:
    if pooling in POOLINGS or pooling in TOKEN_POOLINGS:
        return None
    if pooling.startswith("grid:"):
        try:
            k = int(pooling[5:])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise ConfigError(f"unknown pooling {pooling!r}; choose flatten, avg, max or grid:K (feature maps), "
                      "tokens, cls or mean (token outputs)")


def pooled_units(shape: tuple[int, ...], pooling: str, prefix_tokens: int = 0, class_token: bool = False) -> int:
    """Units per stimulus after pooling an output of ``shape`` (no batch dim)."""
    if pooling == "flatten":
        return math.prod(shape)
    if pooling in TOKEN_POOLINGS:
        return _token_units(tuple(shape), pooling, prefix_tokens, class_token)
    if len(shape) != 3:
        raise ConfigError(f"pooling {pooling!r} needs a (C, H, W) output, the layer gives {tuple(shape)}"
                          + ("; for token outputs use tokens, cls or mean" if len(shape) == 2 else ""))
    grid = pooling_grid(pooling)
    return shape[0] * (grid * grid if grid else 1)


def _token_units(shape: tuple[int, ...], pooling: str, prefix_tokens: int, class_token: bool) -> int:
    """Units of a token pooling of a (tokens, C) output: tokens·C for ``tokens``, C for ``cls``
    (the class token, the first) and ``mean`` (the mean of the patch tokens, after the
    ``prefix_tokens`` class and register tokens)."""
    if len(shape) != 2:
        raise ConfigError(f"pooling {pooling!r} needs a (tokens, channels) output, the layer gives {shape}"
                          + ("; for feature maps use avg, max or grid:K" if len(shape) == 3 else ""))
    if pooling == "tokens":
        return shape[0] * shape[1]
    if pooling == "cls" and not class_token:
        raise ConfigError("pooling 'cls' needs a model with a class token, and this one declares none (timm's "
                          "has_class_token / num_prefix_tokens, OpenCLIP's class_embedding); use mean or tokens")
    if shape[0] <= prefix_tokens:
        raise ConfigError(f"pooling {pooling!r}: the layer gives {shape[0]} tokens, no more than the model's "
                          f"{prefix_tokens} class/register tokens, so it has no patch tokens; hook a later layer")
    return shape[1]


class CountSketch:
    """Seeded count sketch: unit i goes to bucket h(i) with sign s(i).

    Linear, O(units) parameters regenerated from the seed, and unbiased for inner
    products: E[<Sx, Sy>] = <x, y>, with variance ≤ 2‖x‖²‖y‖²/m.

    Applied without multiplying the batch by the signs: each unit is summed into one of
    2m accumulators, ``2 h(i) + [s(i) < 0]``, and bucket b is accumulator 2b minus 2b+1.
    Same result, one pass over the batch instead of three (the signed copy costs more
    than the scatter on a 2.56M-unit layer).
    """

    def __init__(self, units: int, dim: int, seed: int, device: str = "cpu"):
        import torch

        gen = torch.Generator().manual_seed(int(seed))
        self.units, self.dim, self.seed = int(units), int(dim), int(seed)
        buckets = torch.randint(0, dim, (units,), generator=gen, dtype=torch.int64)
        negative = torch.randint(0, 2, (units,), generator=gen, dtype=torch.int8) == 0
        self.slots = (buckets * 2 + negative).to(device)

    @property
    def buckets(self):
        """h(i) per unit (int64)."""
        return self.slots // 2

    @property
    def signs(self):
        """s(i) per unit (float32, ±1)."""
        import torch

        return (1 - 2 * (self.slots % 2)).to(torch.float32)

    def to(self, device) -> "CountSketch":
        self.slots = self.slots.to(device)
        return self

    def __call__(self, x):
        import torch

        acc = torch.zeros(x.shape[0], 2 * self.dim, dtype=torch.float32, device=x.device)
        acc.index_add_(1, self.slots, x.to(torch.float32))
        return acc[:, 0::2] - acc[:, 1::2]

    def describe(self) -> dict:
        return {"kind": "count_sketch", "units": self.units, "dim": self.dim, "seed": self.seed}

    def restrict(self, kept) -> None:
        """Keep only the units ``kept`` (same buckets and signs): a vector that is zero on the
        dropped units sketches exactly as before."""
        self.slots = self.slots[kept.to(self.slots.device)]


@dataclass
class FitReport:
    n_train: int
    dim_in: int
    dim: int
    rank: int
    energy_kept: float
    exact: bool  # the projection keeps every direction of the training sample
    lossless: bool  # the projection keeps the whole input space (dim == dim_in)
    spectrum: list[float]
    # eigenvalues of the training sample's covariance (rows unit length, then centred), beside
    # the spectrum of an uncentred fit; empty for a centred fit, whose spectrum is that already
    spectrum_centred: list[float] = field(default_factory=list)
    # δ of the training stimuli's in-sample shrinkage (see the module docstring); 0: none
    in_sample_noise: float = 0.0

    def to_manifest(self) -> dict:
        d = asdict(self)
        d.pop("spectrum")
        d.pop("spectrum_centred")
        return d


class LayerReducer:
    """One layer's fitted chain. Call :meth:`prepare` in the hook, then :meth:`project`."""

    def __init__(self, layer: str, shape: tuple[int, ...], config: ReducerConfig, device: str = "cpu"):
        config.validate()
        self.layer, self.shape, self.config, self.device = layer, tuple(shape), config, device
        self.units = pooled_units(self.shape, config.pooling, config.prefix_tokens, config.class_token)
        sketch_dim = self.sketch_dim_for(self.units, config.sketch_dim)
        self.sketch = CountSketch(self.units, sketch_dim, config.sketch_seed, device) if sketch_dim else None
        self.dim_in = sketch_dim or self.units
        self.matrix = None  # (k, dim_in) float32 torch tensor once fitted
        self.bias = None  # (k,) for centred PCA
        self.in_sample = None  # (k,) scale of the training stimuli's projections, when shrunk
        self.in_sample_by_dim = None  # (k,) δ_d per kept dim d (in_sample_noise), when shrunk
        self.report: FitReport | None = None
        self.kept = None  # unit indices kept by --drop-zero-units, once fitted
        self.nonzero = None  # units seen non-zero in the training sample (while fitting)

    @staticmethod
    def sketch_dim_for(units: int, requested: int | None) -> int:
        if requested == 0:
            return 0
        if requested is None:
            if units <= SKETCH_THRESHOLD:
                return 0
            m = SKETCH_MIN
            while m < SKETCH_MAX and m * UNITS_PER_BUCKET < units:
                m *= 2
            return m
        return requested if requested < units else 0

    @property
    def dim(self) -> int:
        if self.matrix is None:
            raise RuntimeError(f"reducer of {self.layer} is not fitted")
        return int(self.matrix.shape[0])

    def to(self, device: str) -> "LayerReducer":
        self.device = device
        if self.kept is not None:
            self.kept = self.kept.to(device)
        if self.sketch is not None:
            self.sketch.to(device)
        if self.matrix is not None:
            self.matrix = self.matrix.to(device)
            self.bias = None if self.bias is None else self.bias.to(device)
        if self.in_sample is not None:
            self.in_sample = self.in_sample.to(device)
        return self

    # -- the hook side ---------------------------------------------------------
    def pool(self, output):
        """Raw layer output (B, ...) → the raw vectors (B, units), float32.

        For ``flatten`` pooling of a float32 output this is a *view* of ``output``: callers
        must not modify it in place, and must not keep it past the hook (a later in-place
        operation, such as DenseNet's ReLU after a transition norm, rewrites it).
        :meth:`reduce_pooled` always returns a new tensor, so nothing of the view survives.
        """
        import torch
        import torch.nn.functional as F

        x = output.detach()
        if self.config.pooling == "avg":
            x = x.float().mean(dim=(2, 3))
        elif self.config.pooling == "max":
            x = x.float().amax(dim=(2, 3))
        elif self.config.pooling == "cls":
            x = x[:, 0]
        elif self.config.pooling == "mean":
            x = x[:, self.config.prefix_tokens:].float().mean(dim=1)
        elif self.config.pooling not in ("flatten", "tokens"):
            x = F.adaptive_avg_pool2d(x.float(), pooling_grid(self.config.pooling))
        x = x.flatten(1).to(torch.float32)
        if x.shape[1] != self.units:
            raise DimensionMismatchError(f"layer {self.layer} gave {x.shape[1]} units, the reducer expects {self.units}")
        return x

    @staticmethod
    def measure(x):
        """Raw L2 norms (B,) and the finite mask (B,): one pass, since a non-finite entry makes the norm non-finite."""
        import torch

        norms = row_norms(x)
        return norms, torch.isfinite(norms)

    def reduce_pooled(self, x, finite, norms=None):
        """Raw vectors (B, units) → (z (B, dim_in), share): z is the input of the projection,
        always a new tensor (``x`` may be a view of the layer's output and is never modified).

        Non-finite rows are zeroed so they cannot poison a fit or a batch product. ``share``
        is None, or once --drop-zero-units has dropped units, each row's norm on the kept
        units over its whole norm (B,): :meth:`project` scales the unit-normalised z by it, so
        a stimulus is normalised by its whole norm (as the training stimuli, zero on the
        dropped units, are) and its cosine with a training stimulus is the raw one. ``norms``:
        the rows' L2 norms where the caller has them (:meth:`prepare`), else computed here.
        """
        import torch

        x, fresh = zero_rows(x, finite, on_device=x.device.type != "cpu")
        share = None
        if self.config.drop_zero_units:
            if self.kept is None:  # fitting: remember which units were ever non-zero
                seen = (x != 0).any(dim=0)
                self.nonzero = seen if self.nonzero is None else self.nonzero | seen
            else:
                whole = row_norms(x) if norms is None else norms
                x, fresh = x.index_select(1, self.kept), True
                kept = row_norms(x)
                share = torch.where(whole > 0, kept / whole.clamp(min=1e-30), torch.zeros_like(whole))
        if self.config.similarity == "correlation":
            x, fresh = x - x.mean(dim=1, keepdim=True), True
        if self.sketch is not None:
            return self.sketch(x), share
        return (x if fresh else x.clone()), share

    def drop_zero_units(self) -> int:
        """After fitting: drop the units that were zero for every training stimulus; their count.

        Training vectors are zero there, so their reduced vectors do not change; later
        stimuli lose whatever they have on those units.
        """
        import torch

        if not self.config.drop_zero_units or self.nonzero is None:
            return 0
        self.kept = torch.nonzero(self.nonzero).flatten()
        if self.sketch is not None:
            self.sketch.restrict(self.kept)
        else:
            self.matrix = self.matrix[:, self.kept.to(self.matrix.device)].contiguous()
            self.dim_in = int(self.kept.numel())
        self.nonzero = None
        return self.units - int(self.kept.numel())

    def restrict_prepared(self, z):
        """A training vector prepared before :meth:`drop_zero_units`, as the projection now expects it."""
        if self.kept is not None and self.sketch is None:
            return z.index_select(1, self.kept.to(z.device))
        return z

    def prepare(self, output, tap=None):
        """Raw layer output → (z (B, dim_in) float32, L2 norms (B,), finite mask (B,), share):
        ``share`` as in :meth:`reduce_pooled` (None before --drop-zero-units drops anything).

        The norms are those of the vectors the chain normalises: the pooled raw activations,
        or for ``correlation`` the row-centred ones (each vector minus its own mean across
        units), so stored vector × norm is the projected representation either way.
        ``tap(x, output, finite)``, when given, sees the pooled raw vectors before they are
        reduced (the evaluation subset keeps its copies there); it must not modify them.
        """
        import torch

        x = self.pool(output)
        norms, finite = self.measure(x)
        if tap is not None:
            tap(x, output, finite)
        if self.config.similarity == "correlation":  # a stable reduction, no centred copy
            norms = torch.sqrt(torch.var(x, dim=1, correction=0) * x.shape[1])
        norms = norms.masked_fill(~finite, 0.0)
        z, share = self.reduce_pooled(x, finite, norms)
        return z, norms, finite, share

    def project(self, z, share=None):
        """(B, dim_in) → (B, k): unit-normalise (then scale each row by ``share``, see
        :meth:`reduce_pooled`), project (norm ≤ 1); an all-zero input stays all-zero."""
        u = normalise_rows(z)
        if share is not None:
            u.mul_(share[:, None])
        y = u @ self.matrix.T
        if self.bias is not None:
            y += self.bias
        return normalise_rows(y) if self.config.renormalises else y

    def project_training(self, z):
        """:meth:`project` for stimuli of the training sample the projection was fitted on:
        scaled per direction by ``in_sample`` where the fit shrinks them (module docstring)."""
        y = self.project(z)
        return y if self.in_sample is None else y.mul_(self.in_sample)

    def __call__(self, output, tap=None, project: bool = True):
        """The hook's work: (projected vectors, or the prepared z with ``project=False``, raw
        norms, finite mask); ``tap`` as in :meth:`prepare`."""
        z, norms, finite, share = self.prepare(output, tap)
        if not project:  # the training sample, prepared before any unit is dropped
            if share is not None:
                raise RuntimeError(f"prepared vectors of {self.layer} asked for after its units were dropped")
            return z, norms, finite
        return self.project(z, share), norms, finite

    # -- fitting ---------------------------------------------------------------
    def fit(self, train) -> FitReport:
        """Fit the projection on the prepared training sample ``train`` (n, dim_in).

        A float32 tensor's rows are scaled to unit length in place (the sample can be GBs;
        :meth:`project` gives the same vectors for them either way), except an inference
        tensor's, which is copied first. A float16 tensor (the pipeline holds a sketched
        layer's sample so, see :func:`held_rows`) must have unit rows already and is read
        block by block, never copied whole (except for ``center``).
        """
        import torch

        z = torch.as_tensor(train)
        if z.dtype != torch.float16 or self.config.center:
            z = z.to(dtype=torch.float32).cpu()
        if z.is_inference():  # made under inference_mode (e.g. straight from a hook): no in-place update
            z = z.clone()
        n, d = z.shape
        if d != self.dim_in:
            raise DimensionMismatchError(f"training sample of {self.layer} has {d} columns, expected {self.dim_in}")
        if n == 0:
            raise ConfigError(f"no training stimuli left for layer {self.layer}")
        if z.dtype == torch.float32:
            normalise_rows(z, in_place=True)  # each stimulus weighs the same
        mean = z.mean(dim=0) if self.config.center else None
        if mean is not None:
            z = z - mean
        evals, directions, scores, centred_evals = _top_directions(z, centred_spectrum=mean is None)
        rank = int((evals > evals[0] * 1e-9).sum()) if evals.numel() and evals[0] > 0 else 0
        k = self._choose_dim(evals, max(rank, 1))
        total = float(evals.clamp(min=0).sum())
        kept = float(evals[:k].clamp(min=0).sum()) / total if total > 0 else 1.0
        self.matrix = directions(k)
        self.bias = None if mean is None else -(self.matrix @ mean)
        noise, self.in_sample, self.in_sample_by_dim = 0.0, None, None
        if mean is None and k < rank:  # an uncentred fit that leaves training directions out
            by_dim, scale = in_sample_shrinkage(scores(k).numpy(), evals[:k].numpy(), total)
            noise = float(by_dim[-1])
            if scale is not None:
                self.in_sample, self.in_sample_by_dim = torch.from_numpy(scale), by_dim
        self.to(self.device)
        self.report = FitReport(
            n_train=n, dim_in=d, dim=k, rank=rank, energy_kept=kept,
            exact=k >= rank, lossless=k >= d, spectrum=[float(v) for v in evals.clamp(min=0).tolist()],
            spectrum_centred=[] if centred_evals is None else [float(v) for v in centred_evals.clamp(min=0).tolist()],
            in_sample_noise=noise,
        )
        return self.report

    def _choose_dim(self, evals, rank: int) -> int:
        if self.config.dim is not None:
            return max(1, min(self.config.dim, rank))
        energy = evals.clamp(min=0).cumsum(0)
        if float(energy[-1]) <= 0:
            return 1
        k = int((energy / energy[-1] < self.config.energy - 1e-12).sum()) + 1
        return max(1, min(k, self.config.max_dim, rank))

    # -- persistence -------------------------------------------------------------
    def save(self, directory: Path) -> dict:
        """Write ``transform.faiss`` (the fitted LinearTransform) atomically; returns its description.

        Touches only this reducer's fitted arrays, so it can run on a thread while another
        layer is fitted (FAISS and the file writes release the GIL).
        """
        import faiss
        import numpy as np

        directory.mkdir(parents=True, exist_ok=True)
        matrix = np.ascontiguousarray(self.matrix.cpu().numpy(), dtype=np.float32)
        transform = faiss.LinearTransform(self.dim_in, matrix.shape[0], self.bias is not None)
        faiss.copy_array_to_vector(matrix.ravel(), transform.A)
        bias = self.bias.cpu().numpy() if self.bias is not None else np.zeros(matrix.shape[0], np.float32)
        faiss.copy_array_to_vector(np.ascontiguousarray(bias, dtype=np.float32), transform.b)
        transform.is_trained = True
        if self.kept is not None:
            save_array(directory / "kept_units.npy", self.kept.cpu().numpy().astype(np.int64))
        if self.in_sample_by_dim is not None:
            save_array(directory / "in_sample_noise.npy", self.in_sample_by_dim)
        target = directory / "transform.faiss"
        tmp = target.with_suffix(".faiss.tmp")
        faiss.write_VectorTransform(transform, str(tmp))
        fsync_replace(tmp, target)
        return self.describe()

    def describe(self) -> dict:
        return {
            "shape": list(self.shape),
            "units": self.units,
            "config": asdict(self.config),
            "sketch": self.sketch.describe() if self.sketch is not None else None,
            "dim_in": self.dim_in,
            "dropped_zero_units": 0 if self.kept is None else self.units - int(self.kept.numel()),
            "fit": self.report.to_manifest() if self.report else None,
            # what the vectors table's raw_norm holds (stores before this key: the norm before
            # row-centring, also for correlation)
            "stored_norm": "row-centred" if self.config.similarity == "correlation" else "raw",
        }

    @classmethod
    def load(cls, layer: str, description: dict, directory: Path, device: str = "cpu") -> "LayerReducer":
        import faiss
        import numpy as np
        import torch

        config = ReducerConfig(**description["config"])
        reducer = cls(layer, tuple(description["shape"]), config, device="cpu")
        path = directory / "transform.faiss"
        try:
            raw = faiss.read_VectorTransform(str(path))  # keep: the downcast view does not own it
            transform = faiss.downcast_VectorTransform(raw)
        except Exception as exc:
            from vecsim.errors import StoreError

            raise StoreError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        from vecsim.errors import StoreError

        if not isinstance(transform, faiss.LinearTransform):
            raise StoreError(f"{path} holds a {type(transform).__name__}, not a linear projection; it is not this store's transform")
        kept_path = directory / "kept_units.npy"
        if kept_path.is_file():
            try:
                kept = np.load(kept_path, allow_pickle=False)
            except Exception as exc:
                raise StoreError(f"cannot read {kept_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            reducer.kept = torch.from_numpy(kept)
            if reducer.sketch is not None:
                reducer.sketch.restrict(reducer.kept)
            else:
                reducer.dim_in = int(reducer.kept.numel())
        k, d = transform.d_out, transform.d_in
        fit_dim = (description.get("fit") or {}).get("dim")
        if d != reducer.dim_in or (fit_dim is not None and k != fit_dim):
            raise StoreError(f"{path} maps {d} to {k} dims, the manifest says {reducer.dim_in} to {fit_dim}; "
                             "it is not this store's transform")
        matrix, bias = faiss.vector_to_array(transform.A), faiss.vector_to_array(transform.b)
        if matrix.size != k * d or (transform.have_bias and bias.size != k):
            raise StoreError(f"{path} is damaged: its matrix has {matrix.size} values for {k}x{d}")
        reducer.matrix = torch.from_numpy(matrix.reshape(k, d).copy())
        if transform.have_bias:
            reducer.bias = torch.from_numpy(bias.copy())
        fit = description.get("fit")
        if fit:
            reducer.report = FitReport(**fit, spectrum=[])
        return reducer.to(device)


def in_sample_noise(scores, evals, total: float):
    """δ_d for d = 1..k (float64, (k,)): the least-squares in-sample inflation of the first d
    kept eigenvalues (module docstring) when the projection keeps d directions; δ_k is the
    stored dim's. The fidelity report uses the smaller d's for its compression levels.

    ``scores`` (n, k): the training sample's projections ``P x̂ᵢ`` (unit or all-zero rows
    x̂ᵢ); ``evals``: the k kept eigenvalues of its second moment; ``total``: the sum of all
    of them (the trace). With C the training cosine matrix, U the first d eigenvectors
    (``scores[:, :d] = U Λ^½``), T = C − UΛUᵀ and Π = I − UUᵀ, minimising Σ_{i≠j} (T − δΠ)ᵢⱼ²
    gives δ = (tr T − Σᵢ TᵢᵢΠᵢᵢ) / (tr Π − Σᵢ Πᵢᵢ²), from per-stimulus terms only (no n×n
    matrix). Clamped to [0, λ_d]; 0 where nothing is left out (d ≥ n).
    """
    import numpy as np

    y = np.asarray(scores, dtype=np.float64)
    n, k = y.shape
    lam = np.asarray(evals, dtype=np.float64)[:k]
    noise = np.zeros(k)
    if k == 0 or lam.size < k:
        return noise
    squares = y * y
    kept = np.cumsum(squares, axis=1)  # (n, d): energy of each row in the first d directions
    nonzero = (kept[:, -1] > 0).astype(np.float64)[:, None]  # a unit row; an all-zero one has no energy
    pi_diag = 1.0 - np.cumsum(squares / np.maximum(lam, 1e-300), axis=1)
    d = np.arange(1, k + 1)
    numerator = (float(total) - np.cumsum(lam)) - np.einsum("id,id->d", nonzero - kept, pi_diag)
    denominator = (n - d) - np.einsum("id,id->d", pi_diag, pi_diag)
    ok = (d < n) & (lam > 0) & (denominator > 1e-9 * n) & (numerator > 0)
    noise[ok] = np.minimum(numerator[ok] / denominator[ok], lam[ok])
    return noise


def in_sample_shrinkage(scores, evals, total: float):
    """(δ_d per dim, :func:`in_sample_noise`; the scale D of the training vectors at the last
    dim, :func:`in_sample_scale`, or None where δ is 0): what a fit keeping these directions
    does to its training sample's ``scores``."""
    by_dim = in_sample_noise(scores, evals, total)
    return by_dim, (in_sample_scale(evals, by_dim[-1]) if by_dim.size and by_dim[-1] > 0 else None)


def in_sample_scale(evals, noise: float):
    """The per-direction scale ``D = (1 − δ/λ)^½`` (float32) of the training stimuli's projections."""
    import numpy as np

    lam = np.asarray(evals, dtype=np.float64)
    return np.sqrt(np.clip(1.0 - noise / np.maximum(lam, 1e-300), 0.0, 1.0)).astype(np.float32)


def zero_rows(x, keep, on_device: bool = False):
    """(x with the rows where ``keep`` is False set to zero, whether that is a new tensor); ``x``
    itself is never modified.

    On the CPU the mask is checked first, so the usual all-finite batch costs no copy. On a
    GPU that check would make the host wait for the device in the middle of the forward
    pass (inside the hook), so the masked copy is made unconditionally there; it is cheap.
    """
    if on_device:
        return x.masked_fill(~keep[:, None], 0.0), True
    if bool(keep.all()):
        return x, False
    x = x.clone()
    x[~keep] = 0.0
    return x, True


# Row norms are summed from float32 norms of column blocks of this many units, in float64:
# torch's float32 norm of a whole row loses precision with its length (relative error 7e-7
# at 65,536 units, 8e-6 at 640,000, 5e-5 at 2,560,000 on random data); blocks keep it near 1e-7
# at the cost of the plain norm.
NORM_BLOCK = 16384


def row_norms(z):
    """L2 norms (B,) of the rows of ``z`` (B, d), in ``z``'s dtype (see NORM_BLOCK); a
    non-finite entry makes its row's norm non-finite."""
    import torch

    d = z.shape[1]
    if d <= NORM_BLOCK:
        return torch.linalg.vector_norm(z, dim=1)
    if z.stride(1) != 1:  # torch's norm is as imprecise as the whole row's along a strided dim
        total = sum(torch.linalg.vector_norm(z[:, start : start + NORM_BLOCK].contiguous(), dim=1)
                    .to(torch.float64).square() for start in range(0, d, NORM_BLOCK))
        return total.sqrt().to(z.dtype)
    whole = d - d % NORM_BLOCK  # the whole blocks in one call (a few kernel launches on a GPU), then the rest
    blocks = torch.linalg.vector_norm(z[:, :whole].reshape(z.shape[0], -1, NORM_BLOCK), dim=2)
    total = blocks.to(torch.float64).square().sum(dim=1)
    if whole < d:
        total += torch.linalg.vector_norm(z[:, whole:], dim=1).to(torch.float64).square()
    return total.sqrt().to(z.dtype)


def normalise_rows(z, in_place: bool = False):
    """Rows scaled to unit L2 norm (a new tensor, or ``z`` itself with ``in_place``); all-zero
    rows stay zero."""
    norms = row_norms(z).clamp_(min=1e-30)[:, None]
    return z.div_(norms) if in_place else z / norms


GRAM_TILE = 128


def add_gram(out, z) -> None:
    """``out += z @ z.T`` on the tiles on and above the diagonal only (about half the products
    for many rows), in place and with no temporary larger than one tile row. The entries
    below those tiles are left as they are: call :func:`mirror_upper` once after the last add.
    """
    n = z.shape[0]
    for start in range(0, n, GRAM_TILE):
        out[start : start + GRAM_TILE, start:] += z[start : start + GRAM_TILE] @ z[start:].T


def mirror_upper(out) -> None:
    """In place: the upper triangle of the square ``out`` copied onto its lower one, so it is
    exactly symmetric (tile by tile, no full-size temporary)."""
    import torch

    n = out.shape[0]
    for start in range(0, n, GRAM_TILE):
        stop = min(n, start + GRAM_TILE)
        tile = out[start:stop, start:stop]
        tile.copy_(torch.triu(tile) + torch.triu(tile, 1).T)
        out[stop:, start:stop] = out[start:stop, stop:].T


def _top_directions(z, centred_spectrum: bool = False):
    """Eigenvalues (descending) of zᵀz; a function ``k → (k, dim_in)`` float32 matrix whose rows
    are the top k eigenvectors; a function ``k → (n, k)`` float32 scores of the rows of z on
    them (``z @ directions(k).T``; from the Gram's eigenpairs, ``U_k Λ_k^½``, with no pass
    over z when it has fewer rows than columns); and with ``centred_spectrum`` the eigenvalues
    of (z − z̄)ᵀ(z − z̄) (else None), from the same matrix.

    With fewer rows than columns the n×n Gram matrix is decomposed instead of the d×d
    second-moment matrix (the cost that makes FAISS PCAMatrix impractical on huge
    layers); both are accumulated in float64. The rows are built for the k asked for only,
    block by block: no (d, n) basis is ever held (on a 131,072-dim sketch of 1,000 stimuli
    that would be 0.5 GB).
    """
    import torch

    n, d = z.shape
    centred = None
    if n <= d:
        gram = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, d, GRAM_BLOCK):
            add_gram(gram, z[:, start : start + GRAM_BLOCK].to(torch.float64))
        mirror_upper(gram)
        if centred_spectrum:  # H G H with H = I − 11ᵀ/n has the covariance's non-zero eigenvalues
            rows = gram.mean(dim=1, keepdim=True)
            centred = torch.linalg.eigvalsh(gram - rows - rows.T + gram.mean()).flip(0)
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0), evecs.flip(1)
        evecs = _fix_signs(evecs)
        positive = evals > 0
        scale = torch.zeros_like(evals)
        scale[positive] = evals[positive].rsqrt()

        def directions(k: int):
            weights = (evecs[:, :k] * scale[:k]).T.to(torch.float32).contiguous()  # (k, n)
            out = torch.empty(k, d, dtype=torch.float32)
            for start in range(0, d, GRAM_BLOCK):
                out[:, start : start + GRAM_BLOCK] = weights @ z[:, start : start + GRAM_BLOCK].to(torch.float32)
            return out

        def scores(k: int):
            return (evecs[:, :k] * evals[:k].clamp(min=0).sqrt()).to(torch.float32)

        return evals, directions, scores, centred
    second = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, GRAM_BLOCK):
        add_gram(second, z[start : start + GRAM_BLOCK].to(torch.float64).T)
    mirror_upper(second)
    if centred_spectrum:
        mean = sum(z[start : start + GRAM_BLOCK].to(torch.float64).sum(dim=0) for start in range(0, n, GRAM_BLOCK)) / n
        centred = torch.linalg.eigvalsh(second - n * torch.outer(mean, mean)).flip(0)
    evals, evecs = torch.linalg.eigh(second)
    evals, evecs = evals.flip(0), _fix_signs(evecs.flip(1))

    def directions(k: int):
        return evecs[:, :k].T.to(torch.float32).contiguous()

    def scores(k: int):  # z read in row blocks (it may be float16)
        rows = directions(k).T
        return torch.cat([z[start : start + GRAM_BLOCK].to(torch.float32) @ rows for start in range(0, n, GRAM_BLOCK)])

    return evals, directions, scores, centred


def held_dtype(reducer):
    """The dtype the pipeline holds a layer's training sample in while it is gathered:
    float16 unit rows for a sketched layer (half the memory; their rounding, 2⁻¹¹ per entry,
    moves a sketched cosine by about 2⁻¹¹/√m, three orders below the sketch's own error),
    float32 otherwise (an unsketched layer's projection can be exact)."""
    import torch

    return torch.float16 if reducer.sketch is not None else torch.float32


def held_rows(reducer, z):
    """Prepared vectors ``z`` as the pipeline holds them (:func:`held_dtype`): float16 ones are
    unit rows (within float16's range whatever the activations; :meth:`LayerReducer.fit`
    takes them as they are), float32 ones unchanged (the fit normalises them)."""
    import torch

    return normalise_rows(z).to(torch.float16) if held_dtype(reducer) == torch.float16 else z


def _fix_signs(vectors):
    """Make each column's largest-magnitude entry positive, so fits are reproducible."""
    import torch

    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def per_layer(spec: str, layers: list[str], flag: str, parse, default):
    """'value' or 'layer=value,...[,value]' → parsed value per layer (a bare value is the default)."""
    from vecsim.errors import UnknownLayerError, close_matches

    chosen: dict = {}
    for item in (part.strip() for part in str(spec).split(",")):
        if not item:
            continue
        if "=" in item:
            name, value = (part.strip() for part in item.rsplit("=", 1))
            if name not in layers:
                raise UnknownLayerError(f"--{flag} names layer {name!r}, which is not hooked{close_matches(name, layers)}")
            chosen[name] = parse(value)
        else:
            default = parse(item)
    return {layer: chosen.get(layer, default) for layer in layers}


def parse_dims(spec: str | int | None, layers: list[str]) -> dict[str, int | None]:
    """'256', 'auto', or 'layer=N,...[,N]' → per-layer dim (None = auto)."""
    if spec is None or isinstance(spec, int):
        return {layer: 256 if spec is None else spec for layer in layers}
    return per_layer(spec, layers, "dim", _parse_dim_value, 256)


def _parse_dim_value(value: str) -> int | None:
    value = value.strip().lower()
    if value == "auto":
        return None
    try:
        dim = int(value)
    except ValueError:
        raise ConfigError(f"--dim value {value!r} is not a number or 'auto'") from None
    if dim < 1:
        raise ConfigError(f"--dim must be at least 1, not {dim}")
    return dim

