"""Check the findings of Liao et al. 2020 against a sweep's numbers.

Z. Liao, T. Drummond, I. Reid and G. Carneiro, "Approximate Fisher
Information Matrix to Characterise the Training of Deep Neural Networks",
IEEE TPAMI 42(1), 2020, report that C̄_K grows and L_K shrinks with the
batch size, that both grow with the learning rate, that the lowest test
errors sit where both measures are small, and that the configurations can
be ranked from the first epochs. Each check here turns one of these into a
verdict with the numbers behind it:

* a trend holds when Spearman's rho has the stated sign in every row (or
  column) of the learning rate x batch size table that has at least three
  configurations, "partly" when it has it in most of them;
* "both small" holds when the five best configurations lie, on average,
  in the lower half of the C̄_K values and of the L_K values of all ranked
  configurations;
* the early ranking holds when, at 10% of the epochs (at least epoch 1),
  the distance to the optimum region ranks the final test errors with
  rho >= 0.5 (`tools.analysis.early_ranking`), and "partly" when rho > 0.
"""

import dataclasses
import math

import numpy as np
from scipy import stats

from tools import analysis

HOLDS = "holds"
PARTLY = "partly"
FAILS = "does not hold"
NO_DATA = "not enough data"

# Spearman's rho of the early ranking needed for "holds".
EARLY_RHO = 0.5
# Fraction of the epochs at which the early ranking is judged.
EARLY_FRACTION = 0.1


@dataclasses.dataclass
class Claim:
    """One finding and its verdict on a sweep.

    Attributes:
        statement: the finding, as Liao et al. state it.
        verdict: HOLDS, PARTLY, FAILS or NO_DATA.
        evidence: the numbers behind the verdict.
    """

    statement: str
    verdict: str
    evidence: str


def trend(configs, group, metric, along, per):
    """Return Spearman's rho of a metric along one axis of the grid.

    Args:
        configs: DataFrame from `tools.analysis.summarise`.
        group: the group.
        metric: a `METRICS` name, such as "mean_condition_number".
        along: "batch_size" or "learning_rate", the axis of the trend.
        per: the other axis; one rho per value of it.

    Returns:
        A dict {value of `per`: rho}, over the fixed-batch configurations
        without diverged runs and with a finite metric; values of `per`
        with fewer than three such configurations are left out.
    """
    members = configs[
        (configs["group"] == group)
        & (configs["kind"] == "fixed")
        & (configs["num_diverged"] == 0)
        & np.isfinite(configs[f"{metric}_mean"])
    ]
    rhos = {}
    for value, row in members.groupby(per):
        if row[along].nunique() < 3:
            continue
        rho = stats.spearmanr(row[along], row[f"{metric}_mean"]).statistic
        if np.isfinite(rho):
            rhos[float(value)] = float(rho)
    return rhos


def sign_verdict(rhos, sign):
    """Return HOLDS if every rho has `sign` (+1 or -1), PARTLY if most do,
    FAILS otherwise, NO_DATA if there is none."""
    if not rhos:
        return NO_DATA
    agreeing = sum(1 for rho in rhos.values() if rho * sign > 0)
    if agreeing == len(rhos):
        return HOLDS
    if agreeing > len(rhos) / 2:
        return PARTLY
    return FAILS


def _trend_claim(statement, configs, group, metric, along, per, sign):
    rhos = trend(configs, group, metric, along, per)
    name = "lr" if per == "learning_rate" else "B"
    listed = ", ".join(f"{name}={value:g}: {rho:+.2f}"
                       for value, rho in rhos.items())
    evidence = (
        f"Spearman rho of {metric} with {along} per {name}: {listed}"
        if rhos else f"fewer than three {along} values per {name}"
    )
    return Claim(statement, sign_verdict(rhos, sign), evidence)


def both_small_claim(configs, group, top=analysis.TOP):
    """Check that the best configurations have small C̄_K and small L_K.

    The percentile of a configuration is its rank among the group's ranked
    configurations divided by their number minus one (0 = smallest,
    1 = largest), for C̄_K and L_K separately.
    """
    statement = "The best test errors sit where both C̄_K and L_K are small"
    ranked = configs[
        (configs["group"] == group)
        & configs["rank"].notna()
        & np.isfinite(configs["mean_condition_number_mean"])
        & np.isfinite(configs["cumulative_fisher_energy_mean"])
    ]
    if len(ranked) <= top:
        return Claim(
            statement, NO_DATA,
            f"{len(ranked)} ranked configurations, need more than {top}",
        )
    best = ranked.nsmallest(top, "rank")
    percentiles = {}
    for metric in ("mean_condition_number", "cumulative_fisher_energy"):
        ranks = ranked[f"{metric}_mean"].rank(method="average") - 1
        percentiles[metric] = float(
            (ranks.loc[best.index] / (len(ranked) - 1)).mean()
        )
    small = sum(value < 0.5 for value in percentiles.values())
    verdict = {2: HOLDS, 1: PARTLY, 0: FAILS}[small]
    evidence = (
        f"mean percentile of the top {top} among {len(ranked)} "
        f"configurations (0 = smallest): C̄_K "
        f"{percentiles['mean_condition_number']:.2f}, L_K "
        f"{percentiles['cumulative_fisher_energy']:.2f}; top {top}: "
        + ", ".join(best.sort_values("rank")["label"])
    )
    return Claim(statement, verdict, evidence)


def early_ranking_claim(ranking, num_epochs):
    """Check that the distance to the optimum region ranks the
    configurations at `EARLY_FRACTION` of the epochs."""
    statement = "The ranking is visible after the first epochs"
    early = max(1, math.ceil(EARLY_FRACTION * num_epochs))
    row = ranking[ranking["epoch"] == early]
    if row.empty or not np.isfinite(row["distance_rho"].iloc[0]):
        return Claim(statement, NO_DATA, f"no ranking at epoch {early}")
    row = row.iloc[0]
    rho = row["distance_rho"]
    if rho >= EARLY_RHO:
        verdict = HOLDS
    elif rho > 0:
        verdict = PARTLY
    else:
        verdict = FAILS
    first = ranking[ranking["epoch"] <= max(early, 3)]
    listed = ", ".join(
        f"epoch {int(epoch)}: {value:+.2f}"
        for epoch, value in zip(first["epoch"], first["distance_rho"])
    )
    evidence = (
        f"at epoch {early} of {num_epochs}: rho(distance to optimum, final "
        f"test error) = {rho:+.2f} (p = {row['distance_p']:.2g}, "
        f"{int(row['num_configurations'])} configurations); rho of that "
        f"epoch's test error = {row['test_error_rho']:+.2f}; rho of C̄_K "
        f"and L_K with their final values = {row['condition_rho']:+.2f}, "
        f"{row['energy_rho']:+.2f}. Distance rho by epoch: {listed}"
    )
    return Claim(statement, verdict, evidence)


def check_claims(configs, ranking, group, num_epochs):
    """Return the `Claim`s of Liao et al. 2020 checked on one group."""
    return [
        _trend_claim(
            "C̄_K grows with the batch size", configs, group,
            "mean_condition_number", "batch_size", "learning_rate", +1,
        ),
        _trend_claim(
            "L_K shrinks with the batch size", configs, group,
            "cumulative_fisher_energy", "batch_size", "learning_rate", -1,
        ),
        _trend_claim(
            "L_K grows with the learning rate", configs, group,
            "cumulative_fisher_energy", "learning_rate", "batch_size", +1,
        ),
        _trend_claim(
            "C̄_K grows with the learning rate", configs, group,
            "mean_condition_number", "learning_rate", "batch_size", +1,
        ),
        both_small_claim(configs, group),
        early_ranking_claim(ranking, num_epochs),
    ]


if __name__ == "__main__":
    import tools

    raise SystemExit(tools.print_not_a_command("tools.claims"))
