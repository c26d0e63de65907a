"""lme4-style formulas read into tensors: the fixed-effects design, the
response, and one block of random effects per ``( ... | g)`` term.

The parsing is ``formulae``'s (Bambi's parser): fixed effects with factors,
interactions, ``C()``, ``I()`` and transformations, ``offset()``, and the
group-specific terms ``(1 + x | g)``, ``g1/g2`` nesting and ``g1:g2``
interactions. curvi adds what lme4 has and formulae does not: which columns
of a grouping factor share a covariance matrix (one block per bar;
``(x || g)`` is lme4's shorthand for ``(1 | g) + (0 + x | g)``), ``cbind(successes, failures)``
responses, and checks that name the column at fault. :func:`read_formula`
returns a :class:`Design`; :meth:`Design.new_data` evaluates the same
formula on new rows for prediction.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Design", "GroupingFactor", "RandomBlock", "read_formula", "split_bars"]


@dataclass(frozen=True)
class GroupingFactor:
    """A grouping factor: its observed ``levels`` (as strings, in formulae's
    order) and each row's level ``index`` (LongTensor, ``(n,)``)."""

    name: str
    levels: tuple[str, ...]
    index: torch.Tensor


@dataclass(frozen=True)
class RandomBlock:
    """The random effects of one bar on one grouping factor.

    ``design`` is ``(n, k)``: row i's covariates for the block's ``columns``
    (``"Intercept"`` for ``1``). ``correlated``: a full k×k covariance
    (``|``; k = 1 otherwise: ``||`` gives one block per term). ``terms`` are formulae's
    term names (``"1|herd"``, ``"Days|Subject"``).
    """

    factor: str
    columns: tuple[str, ...]
    correlated: bool
    design: torch.Tensor
    terms: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.columns)


@dataclass
class Design:
    """A formula evaluated on a data frame.

    :ivar str formula: the formula as given.
    :ivar str response_name: the response as written (``"p(incidence, size)"``).
    :ivar torch.Tensor response: ``(n,)`` responses (successes for a binomial proportion).
    :ivar trials: ``(n,)`` trials of a binomial proportion, else None.
    :ivar torch.Tensor fixed: ``(n, p)`` fixed-effects design.
    :ivar tuple fixed_names: its column names, formulae's (``"Intercept"``, ``"period[2]"``).
    :ivar offset: ``(n,)`` summed ``offset()`` terms, or None.
    :ivar weights: ``(n,)`` prior weights, or None.
    :ivar dict factors: :class:`GroupingFactor` by name, in order of appearance.
    :ivar list blocks: the :class:`RandomBlock` list.
    :ivar rows: positions (in the data frame given) of the rows used.
    """

    formula: str
    response_name: str
    response: torch.Tensor
    trials: torch.Tensor | None
    fixed: torch.Tensor
    fixed_names: tuple[str, ...]
    offset: torch.Tensor | None
    weights: torch.Tensor | None
    factors: dict[str, GroupingFactor]
    blocks: list[RandomBlock]
    rows: np.ndarray
    _fixed_matrices: object = field(repr=False, default=None)
    _bar_matrices: list = field(repr=False, default_factory=list)
    _offset_terms: tuple = field(repr=False, default=())

    @property
    def num_observations(self) -> int:
        return self.response.shape[0]

    def new_data(self, data) -> tuple[torch.Tensor, torch.Tensor | None, dict, list]:
        """The formula on new rows: ``(fixed, offset, index by factor, block designs)``.

        A level not seen in the fit gets index −1 (its random effects are
        then zero, the population-level prediction, as glmmTMB's
        ``allow.new.levels``).
        """
        data = _as_frame(data, "newdata")
        like = dict(dtype=self.fixed.dtype, device=self.fixed.device)
        fixed = offset = None
        if self._fixed_matrices is not None and self._fixed_matrices.common is not None:
            common = self._fixed_matrices.common
            needed = set().union(*(t.var_names for t in common.terms.values()))
            _require_columns(data, sorted(needed), "newdata")
            values = self._fixed_matrices.common.evaluate_new_data(data).design_matrix
            fixed, offset = _columns_and_offset(np.asarray(values, dtype=float), self._offset_terms, like)
        if fixed is None:
            fixed = torch.zeros(len(data), 0, **like)
        index, designs = {}, []
        for group in self._bar_matrices:
            _require_columns(data, sorted(_group_var_names(group)), "newdata")
            for term in group.terms.values():
                name = term.factor.name
                if name in index:
                    continue
                codes, new_groups = term.eval_new_data_group_index(data)
                fitted = self.factors[name]
                position = {level: i for i, level in enumerate(fitted.levels)}
                all_levels = list(term.groups) + [
                    ":".join(map(str, g)) if isinstance(g, tuple) else str(g) for g in new_groups
                ]
                mapped = [position.get(all_levels[c], -1) if c >= 0 else -1 for c in codes]
                index[name] = torch.tensor(mapped, dtype=torch.long, device=like["device"])
                unseen = sorted(
                    {all_levels[c] if c >= 0 else "<missing>" for c, m in zip(codes, mapped) if m < 0}
                )
                if unseen:
                    warnings.warn(
                        f"newdata has levels of {name!r} not seen in the fit ({unseen[:5]}"
                        f"{' ...' if len(unseen) > 5 else ''}): their random effects are 0, the "
                        "population-level prediction (glmmTMB's allow.new.levels)",
                        UserWarning,
                        3,
                    )
        for block in self.blocks:
            group = next(g for g in self._bar_matrices if block.terms[0] in g.terms)
            columns = [_column(group.terms[t].expr.eval_new_data(data)) for t in block.terms]
            designs.append(torch.as_tensor(np.concatenate(columns, axis=1), **like))
        return fixed, offset, index, designs


_BAR = re.compile(r"\|\|?")


def split_bars(rhs: str) -> tuple[str, list[tuple[str, str, bool]]]:
    """Split a right-hand side into its fixed part and its bars.

    Returns ``(fixed, [(expr, factor, double_bar), ...])``; a bar is a
    top-level parenthesised ``expr | factor`` or ``expr || factor``.

    Usage::

        split_bars("Days + (Days || Subject) + (1 | a/b)")
        # ('Days', [('Days', 'Subject', True), ('1', 'a/b', False)])
    """
    bars, kept, depth, start, last = [], [], 0, None, 0
    for i, c in enumerate(rhs):
        if c == "(":
            if depth == 0:
                start = i
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"formula: unbalanced ')' in {rhs!r}")
            if depth == 0:
                inner = rhs[start + 1 : i]
                bar = _top_level_bar(inner)
                if bar is not None and _is_term_start(rhs, start):
                    kept.append(rhs[last:start])
                    last = i + 1
                    expr, factor, double = bar
                    bars.append((expr.strip(), factor.strip(), double))
    if depth != 0:
        raise ValueError(f"formula: unbalanced '(' in {rhs!r}")
    kept.append(rhs[last:])
    pieces = [p.strip() for p in _split_top_level("".join(kept), "+")]
    return " + ".join(p for p in pieces if p), bars


def _expand_double_bars(bars):
    """lme4's ``(x + z || g)`` is ``(1 | g) + (0 + x | g) + (0 + z | g)``:
    one bar, and so one block, per term."""
    out = []
    for expr, factor, double in bars:
        if not double:
            out.append((expr, factor, False))
            continue
        terms = [t.strip() for t in _split_top_level(expr, "+") if t.strip()]
        no_intercept = any(t in ("0", "-1") for t in terms) or expr.replace(" ", "").startswith("-1")
        terms = [t for t in terms if t not in ("0", "1", "-1")]
        if not no_intercept:
            out.append(("1", factor, False))
        out.extend((f"0 + {t}", factor, False) for t in terms)
    return out


def _is_term_start(rhs, start):
    """A bar counts only as a whole term: preceded by nothing, ``+`` or ``~``."""
    before = rhs[:start].rstrip()
    return not before or before[-1] in "+~"


def _top_level_bar(inner):
    depth = 0
    for i, c in enumerate(inner):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            double = inner[i + 1 : i + 2] == "|"
            factor = inner[i + 2 :] if double else inner[i + 1 :]
            if "|" in factor:
                raise ValueError(f"formula: more than one bar in ({inner})")
            return inner[:i], factor, double
    return None


def read_formula(formula: str, data, *, family: str, weights=None, dtype=None, device=None) -> Design:
    """Evaluate an lme4-style formula on a data frame.

    Rows with missing values in the columns the formula uses (or in the
    weights) are dropped with a warning that names the columns and counts
    the rows, as lme4's ``na.omit``; infinite values are an error naming the
    column.

    Usage::

        import pandas as pd
        frame = pd.DataFrame({"y": [1, 0, 1, 1, 0, 1], "x": [0.1, 0.5, 0.2, 0.9, 0.3, 0.4],
                              "g": ["a", "a", "b", "b", "c", "c"]})
        design = read_formula("y ~ x + (1 | g)", frame, family="bernoulli")
        design.fixed_names, design.factors["g"].levels   # ('Intercept', 'x'), ('a', 'b', 'c')

    :param str formula: ``response ~ fixed + (expr | g) + ...``.
    :param data: a pandas DataFrame (or anything ``pandas.DataFrame`` accepts).
    :param str family: decides how the response is read (see :func:`curvi.glmm`).
    :param weights: a column name, or an array of one weight per row.
    """
    import formulae

    data = _as_frame(data, "data")
    if not isinstance(formula, str) or "~" not in formula:
        raise ValueError(f"formula must be a string 'response ~ terms', got {formula!r}")
    lhs, rhs = (s.strip() for s in formula.split("~", 1))
    if not lhs:
        raise ValueError(f"formula {formula!r} has no response left of '~'")
    written = lhs
    data, lhs = _rewrite_cbind(data, lhs)
    fixed_rhs, bars = split_bars(rhs)
    if not fixed_rhs:
        fixed_rhs = "1"
    weights = _weights_column(data, weights)
    used = _used_columns(formulae, data, lhs, fixed_rhs, bars)
    data, rows = _drop_missing(data, used, weights)
    if weights is not None:
        weights = weights[rows]
    like = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    try:
        matrices = formulae.design_matrices(f"{lhs} ~ {fixed_rhs}", data, na_action="error")
    except Exception as error:  # formulae's messages name the term; add the formula
        raise ValueError(f"formula {formula!r}: {error}") from error
    response, trials = _response(matrices.response, written, family, like)
    fixed, offset, offset_terms, names = _fixed(matrices.common, like)
    if matrices.common is None:  # "y ~ 0 + (1 | g)": no fixed effects
        fixed = response.new_zeros(response.shape[0], 0)
    factors, blocks, bar_matrices = {}, [], []
    for expr, factor, double in _expand_double_bars(bars):
        try:
            group = formulae.design_matrices(f"0 + ({expr} | {factor})", data, na_action="error").group
        except Exception as error:
            raise ValueError(
                f"formula {formula!r}: random-effect term ({expr} | {factor}): {error}"
            ) from error
        if group is None:
            raise ValueError(f"formula {formula!r}: ({expr} | {factor}) has no random effects")
        bar_matrices.append(group)
        blocks.extend(_bar_blocks(group, factors, not double, like, formula))
    _check_blocks(blocks, formula)
    _check_levels(factors, len(data), family, formula)
    design = Design(
        formula,
        written,
        response,
        trials,
        fixed,
        names,
        offset,
        None if weights is None else torch.as_tensor(weights, **like),
        factors,
        blocks,
        rows,
        matrices,
        bar_matrices,
        offset_terms,
    )
    _check_finite(design)
    return design


def _as_frame(data, name):
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    try:
        return pd.DataFrame(data)
    except Exception as error:
        raise TypeError(
            f"{name} must be a pandas DataFrame or a dict of columns, got {type(data)}"
        ) from error


def _require_columns(data, names, argument):
    missing = [n for n in names if n not in data.columns]
    if missing:
        raise ValueError(
            f"{argument} has no column {missing[0]!r} (the formula uses {list(names)}; "
            f"{argument} has {list(data.columns)})"
        )


def _rewrite_cbind(data, lhs):
    """lme4's ``cbind(successes, failures)`` as formulae's ``p(successes, trials)``."""
    match = re.fullmatch(r"cbind\((.*)\)", lhs.replace(" ", ""))
    if not match:
        return data, lhs
    args = _split_top_level(match.group(1), ",")
    if len(args) != 2:
        raise ValueError(f"cbind() in the response takes (successes, failures), got {lhs!r}")
    data = data.copy()
    successes = _evaluate(data, args[0], lhs)
    failures = _evaluate(data, args[1], lhs)
    for name in _CBIND:
        if name in data.columns:
            raise ValueError(f"data has a column {name!r}, which curvi uses to read cbind(); rename it")
    data[_CBIND[0]], data[_CBIND[1]] = successes, successes + failures
    return data, f"p({_CBIND[0]}, {_CBIND[1]})"


_CBIND = ("cbind_successes", "cbind_trials")


def _split_top_level(text, separator):
    """``text`` split at ``separator`` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c == "("
        depth -= c == ")"
        if c == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _evaluate(data, expression, lhs):
    try:
        return data.eval(expression)
    except Exception as error:
        raise ValueError(f"response {lhs!r}: cannot evaluate {expression!r} on the data ({error})") from error


def _weights_column(data, weights):
    if weights is None:
        return None
    if isinstance(weights, str):
        _require_columns(data, [weights], "data")
        values = data[weights].to_numpy(dtype=float)
        label = f"weights column {weights!r}"
    else:
        values = np.asarray(weights, dtype=float).reshape(-1)
        label = "weights"
        if values.shape[0] != len(data):
            raise ValueError(f"weights has {values.shape[0]} values for {len(data)} rows of data")
    finite = values[~np.isnan(values)]
    if (finite < 0).any() or np.isinf(finite).any():
        raise ValueError(f"{label} must be finite and non-negative")
    return values


def _used_columns(formulae, data, lhs, fixed_rhs, bars):
    """The data columns the formula reads (for missing values), each one checked present."""
    text = f"{lhs} ~ {fixed_rhs}" + "".join(f" + ({e} | {f})" for e, f, _ in bars)
    try:
        names = formulae.model_description(text).var_names
    except Exception as error:
        raise ValueError(f"formula {text!r}: {error}") from error
    names = sorted(n for n in names if n)  # formulae lists "" for a literal inside I()
    _require_columns(data, names, "data")
    return names


def _drop_missing(data, used, weights):
    missing = data[used].isna().to_numpy()
    bad = missing.any(axis=1)
    if weights is not None:
        bad |= np.isnan(weights)
    if bad.all():
        raise ValueError(f"every row has a missing value in the formula's columns {used}")
    if bad.any():
        columns = [c for c, m in zip(used, missing.any(axis=0)) if m]
        if weights is not None and np.isnan(weights).any():
            columns.append("weights")
        warnings.warn(
            f"dropped {int(bad.sum())} of {len(data)} rows with missing values in {columns} "
            "(as lme4's na.omit)",
            stacklevel=3,
        )
    rows = np.flatnonzero(~bad)
    return data.iloc[rows].reset_index(drop=True), rows


def _response(response, lhs, family, like):
    values = np.asarray(response.design_matrix, dtype=float)
    if response.kind == "proportion":
        successes, trials = values[:, 0], values[:, 1]
        if family != "binomial":
            raise ValueError(
                f"response {lhs!r} is a proportion (successes, trials): family must be 'binomial'"
            )
        if (trials < 0).any() or (successes < 0).any() or (successes > trials).any():
            raise ValueError(f"response {lhs!r}: successes must lie in 0..trials")
        if (np.round(trials) != trials).any() or (np.round(successes) != successes).any():
            raise ValueError(f"response {lhs!r}: successes and trials must be whole numbers")
        return torch.as_tensor(successes, **like), torch.as_tensor(trials, **like)
    values = values.reshape(values.shape[0], -1)
    if values.shape[1] != 1:
        raise ValueError(
            f"response {lhs!r} has {values.shape[1]} columns; a binary response of a factor "
            "is written y[level] (or give 0/1 values)"
        )
    values = values[:, 0]
    if not np.isfinite(values).all():
        raise ValueError(f"response {lhs!r} has infinite values")
    if family in ("binomial", "bernoulli") and not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(
            f"response {lhs!r} must be 0/1 for family {family!r}; for counts out of trials write "
            "p(successes, trials) or cbind(successes, failures)"
        )
    if family in ("poisson", "negativebinomial"):
        if (values < 0).any() or (np.round(values) != values).any():
            bad = values[(values < 0) | (np.round(values) != values)][0]
            raise ValueError(
                f"response {lhs!r} must hold non-negative whole numbers for family {family!r} (found {bad:g})"
            )
    return torch.as_tensor(values.copy(), **like), None


def _columns_and_offset(values, offset_slices, like):
    keep = np.ones(values.shape[1], dtype=bool)
    offset = None
    for piece in offset_slices:
        keep[piece] = False
        part = values[:, piece].sum(axis=1)
        offset = part if offset is None else offset + part
    fixed = torch.as_tensor(values[:, keep], **like)
    return fixed, None if offset is None else torch.as_tensor(offset, **like)


def _fixed(common, like):
    if common is None:
        return torch.zeros(0, 0, **like), None, (), ()
    values = np.asarray(common.design_matrix, dtype=float)
    offsets, names = [], []
    for name, term in common.terms.items():
        if getattr(term, "kind", None) == "offset":
            offsets.append(common.slices[name])
        else:
            names.extend(term.labels)
    fixed, offset = _columns_and_offset(values, offsets, like)
    return fixed, offset, tuple(offsets), tuple(names)


def _column(values):
    values = np.asarray(values, dtype=float)
    return values[:, None] if values.ndim == 1 else values


def _bar_blocks(group, factors, correlated, like, formula):
    """One block per grouping factor of a bar (``g1/g2`` gives two)."""
    by_factor = {}
    for name, term in group.terms.items():
        by_factor.setdefault(term.factor.name, []).append((name, term))
    blocks = []
    for factor, terms in by_factor.items():
        index, levels = _levels(terms[0][1])
        if factor in factors:
            if not torch.equal(factors[factor].index, torch.as_tensor(index)):
                raise ValueError(f"formula {formula!r}: grouping factor {factor!r} read two ways")
        else:
            factors[factor] = GroupingFactor(factor, levels, torch.as_tensor(index, device=like["device"]))
        columns, names = [], []
        for _, term in terms:
            columns.append(_column(term.expr.data))
            names.extend(term.expr.labels)
        design = torch.as_tensor(np.concatenate(columns, axis=1), **like)
        blocks.append(
            RandomBlock(
                factor, tuple(names), correlated and design.shape[1] > 1, design, tuple(n for n, _ in terms)
            )
        )
    return blocks


def _levels(term):
    """Row codes over the observed levels only (an interaction's empty cells dropped, as lme4)."""
    codes = np.asarray(term.factor.data).argmax(axis=1)
    observed = np.unique(codes)
    remap = np.full(len(term.groups), -1, dtype=np.int64)
    remap[observed] = np.arange(len(observed))
    return remap[codes], tuple(term.groups[i] for i in observed)


def _group_var_names(group):
    names = set()
    for term in group.terms.values():
        names |= term.var_names
    return names


def _check_blocks(blocks, formula):
    seen = set()
    for block in blocks:
        for column in block.columns:
            key = (block.factor, column)
            if key in seen:
                raise ValueError(
                    f"formula {formula!r}: the random effect {column!r} on {block.factor!r} appears "
                    "in two terms; write each column of a grouping factor once"
                )
            seen.add(key)


def _check_levels(factors, num_rows, family, formula):
    for factor in factors.values():
        if len(factor.levels) < 2:
            raise ValueError(
                f"formula {formula!r}: grouping factor {factor.name!r} has {len(factor.levels)} level "
                f"({list(factor.levels)}); a random effect needs at least 2 (make it a fixed effect)"
            )
        if family == "gaussian" and len(factor.levels) >= num_rows:
            raise ValueError(
                f"formula {formula!r}: grouping factor {factor.name!r} has {len(factor.levels)} levels "
                f"for {num_rows} rows; with a Gaussian response its variance is not identifiable from "
                "the residual variance (lme4 refuses the same)"
            )


def _check_finite(design):
    for name, column in zip(design.fixed_names, design.fixed.T):
        if not torch.isfinite(column).all():
            raise ValueError(f"fixed-effect column {name!r} has infinite or undefined values")
    if design.offset is not None and not torch.isfinite(design.offset).all():
        raise ValueError("offset() has infinite or undefined values")
    for block in design.blocks:
        for name, column in zip(block.columns, block.design.T):
            if not torch.isfinite(column).all():
                raise ValueError(f"random-effect column {name!r} on {block.factor!r} has infinite values")
