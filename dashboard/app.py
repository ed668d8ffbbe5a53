"""The review dashboard: studies in the store, arms compared over folds, the worst cases.

Run it with `brats-lab dashboard` (or `streamlit run dashboard/app.py` from the project root). It
reads the store through `brats_lab.tracking` (mlruns/ here, or MLFLOW_TRACKING_URI) and never
writes to it. Data shaping lives in `brats_lab.review` and pictures in `brats_lab.viz`; this file
only lays pages out.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from brats_lab import review
from brats_lab import run_files, tracking, viz
from brats_lab.data.cases import MODALITIES
from brats_lab.labels import REGIONS
from brats_lab.urls import safe_url, url_password

st.set_page_config(page_title="brats-lab review", layout="wide")
PAGES = ("Studies", "Compare", "Cases")
# The paper's colours, one per region, so a region looks the same on every chart.
REGION_COLOURS = {"ET": "#d62728", "TC": "#2ca02c", "WT": "#e6b800"}
# Lesion-wise metrics first: on 2023+ data they are what the challenge ranks by (and the verdict compares).
METRIC_NAMES = {"lesion_dice": "lesion-wise Dice (0-1, higher is better)", "lesion_hd95": "lesion-wise HD95 (mm, lower is better)",
                "dice": "Dice (0-1, higher is better)", "hd95": "HD95 (mm, lower is better)",
                "sensitivity": "sensitivity (0-1, higher is better)", "specificity": "specificity (0-1, higher is better)"}
TTL = 10  # seconds: a running study shows new folds on the next reload after this


@st.cache_data(ttl=TTL, show_spinner=False)
def load_runs(uri: str) -> pd.DataFrame:
    """All runs of the store (the uri keys the cache, so another store is read afresh)."""
    return tracking.read_runs()


@st.cache_data(ttl=TTL, show_spinner="Reading per-case metrics...")
def load_per_case(uri: str, cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return review.load_per_case(cells)


@st.cache_data(ttl=TTL, show_spinner=False)
def load_table(uri: str, run_id: str, name: str) -> pd.DataFrame | None:
    return review.read_artifact_table(run_id, name)


@st.cache_data(ttl=TTL, show_spinner="Reading training curves...")
def load_curves(uri: str, cells: pd.DataFrame, key: str) -> pd.DataFrame:
    return review.fold_curves(cells, key)


@st.cache_data(max_entries=16, show_spinner="Reading the case's images and predictions...")
def load_case(uri: str, dataset: str | None, case: str, fold_run_ids: tuple[tuple[str, str], ...]) -> review.CaseVolumes:
    return review.case_volumes(dataset, case, dict(fold_run_ids))


def open_study() -> None:
    """A row chosen on the Studies page opens that study on the Compare page."""
    rows = st.session_state["studies_table"].selection.rows
    if rows:
        st.session_state["study"] = st.session_state["studies_order"][rows[0]]
        st.session_state["page"] = "Compare"


uri = tracking.tracking_uri()
shown_uri = safe_url(uri)  # a database URI may hold a password: never on the page
st.sidebar.title("brats-lab review")
page = st.sidebar.radio("Page", PAGES, key="page")
st.sidebar.caption(f"store: `{shown_uri}`")

if not review.store_exists():
    st.info(f"No runs yet: there is no store at `{shown_uri}`. Train with `brats-lab train` or run an "
            "ablation with `brats-lab ablate attention`, then reload this page.")
    st.stop()

try:
    runs = load_runs(uri)
except Exception as e:  # a store that cannot be read: say so on the page, not as a traceback
    password = url_password(uri)  # a driver's message may echo the URI
    st.error(f"Cannot read the store `{shown_uri}`: {str(e).replace(password, '***') if password else e}")
    st.stop()

table = review.studies(runs)
if table.empty:
    st.info("The store has no ablation study and no training yet. Run `brats-lab ablate attention` "
            "or `brats-lab train --pipeline A`, then reload this page.")
    st.stop()

labels = {r.run_id: f"{r.name}  [{r.type}, {r.experiment}, {r.run_id[:8]}]" for r in table.itertuples()}
if st.session_state.get("study") not in labels:
    st.session_state.pop("study", None)  # a study gone from the store (or another store): start afresh
study_id = st.sidebar.selectbox("Study", list(labels), format_func=labels.get, key="study")
study = table.set_index("run_id").loc[study_id]

if page == "Studies":
    st.header("Studies")
    st.caption("Every ablation study and plain training in the store, newest first. Progress counts "
               "finished (arm, fold) runs of those planned. Choose a row to open the study.")
    shown = table.assign(
        progress=[f"{d} / {int(p)}" if pd.notna(p) else f"{d}" for d, p in zip(table["folds_done"], table["folds_planned"])],
        wall_time=table["wall_time"].astype(str),
        started=table["started"].dt.strftime("%Y-%m-%d %H:%M UTC"),
    )
    st.session_state["studies_order"] = list(table["run_id"])
    st.dataframe(shown[["name", "type", "experiment", "state", "progress", "started", "wall_time", "run_id"]],
                 hide_index=True, width="stretch", key="studies_table",
                 on_select=open_study, selection_mode="single-row")
    st.stop()

# --- pages of one study --------------------------------------------------------------------------
cells = review.fold_runs(runs, study_id)
st.header(f"{study['name']} ({study['type']}, {study['state'].lower()})")
if cells.empty:
    st.info("This study has no fold runs yet: its trials have not started. Reload once one has finished.")
    st.stop()
per_case, notes = load_per_case(uri, cells)
for note in notes:
    st.warning(note)
if per_case.empty:
    st.info("No fold of this study has finished yet, so there are no per-case metrics to show.")
    st.stop()
metrics = [m for m in METRIC_NAMES if any(f"{m}_{r}" in per_case.columns for r in REGIONS)]


def compare_page() -> None:
    st.subheader("Mean (std) over folds, Table 3 layout")
    for metric, col in zip(review.ranking_metrics(per_case), st.columns(2)):
        if metric in metrics:
            col.caption(METRIC_NAMES[metric])
            col.dataframe(review.fold_table(per_case, metric), width="stretch")

    metric = st.radio("Metric", metrics, format_func=lambda m: METRIC_NAMES[m].split(" (")[0], horizontal=True)
    st.subheader(f"Per-case {METRIC_NAMES[metric].split(' (')[0]} by arm, fold and region")
    long = review.metric_long(per_case, metric).assign(fold=lambda d: "fold " + d["fold"].astype(str))
    fig = px.box(long, x="arm", y="value", color="fold", facet_col="region", points="all",
                 hover_data=["case"], category_orders={"region": list(REGIONS)})
    fig.update_yaxes(title_text="")
    fig.update_layout(yaxis_title=METRIC_NAMES[metric], boxmode="group", legend_title_text="fold", height=420)
    fig.for_each_annotation(lambda a: a.update(text=a.text.replace("region=", "region ")))
    st.plotly_chart(fig, width="stretch")
    st.caption("Each dot is one validation case of one fold (all seeds); each box spans the quartiles of one fold's cases.")

    st.subheader("Training runs: one mark per fold and seed")
    run_means = review.run_table(per_case, metric).assign(seed=lambda d: "seed " + d["seed"].astype(str),
                                                      fold=lambda d: "fold " + d["fold"].astype(str))
    fig = px.scatter(run_means, x="arm", y="value", color="seed", symbol="fold", facet_col="region",
                   category_orders={"region": list(REGIONS)}, hover_data=["fold", "seed"])
    fig.update_traces(marker={"size": 11})
    fig.update_yaxes(title_text="")
    fig.update_layout(yaxis_title=f"run mean, {METRIC_NAMES[metric]}", legend_title_text="seed, fold", height=380)
    fig.for_each_annotation(lambda a: a.update(text=a.text.replace("region=", "region ")))
    st.plotly_chart(fig, width="stretch")
    st.caption("Each mark is one training run's mean over its validation cases. Runs of one arm and fold that differ only "
               "in their seed show the training noise the verdict is tested against (the noise floor).")

    if study["type"] == "ablation":
        verdict_section(metric)
    curves_section()
    search = load_table(uri, study_id, run_files.SEARCH) if study["type"] == "ablation" else None
    if search is not None and not search.empty:
        st.subheader("Hyperparameter search")
        score = next(c for c in search.columns if c.startswith("mean_"))
        fig = px.parallel_coordinates(search, color=score, color_continuous_scale="Viridis",
                                      dimensions=list(search.columns))
        st.plotly_chart(fig, width="stretch")
        st.caption(f"One line per Optuna trial; colour: its {score.removeprefix('mean_')} over the folds.")


def verdict_section(metric: str) -> None:
    st.subheader("Each arm against the baseline")
    comparison = load_table(uri, study_id, run_files.COMPARISON)
    if comparison is None:
        st.info("No comparison yet: the study writes comparison.csv once every fold has finished.")
        return
    rows = review.comparison_rows(comparison, metric)
    if rows.empty:
        st.info(f"The comparison has no {metric} rows.")
        return
    fig = go.Figure()
    for region in REGIONS:
        part = rows[rows["region"] == region]
        if part.empty:
            continue
        fig.add_trace(go.Scatter(
            x=part["mean_diff"], y=part["label"], mode="markers", name=region,
            marker={"color": REGION_COLOURS[region], "size": 11},
            error_x={"type": "data", "symmetric": False, "array": part["ci_high"] - part["mean_diff"],
                     "arrayminus": part["mean_diff"] - part["ci_low"]},
            text=[f"p (Holm) {p:.3g}: {v}; noise floor " + (f"{nf:.4g}" if pd.notna(nf) else "n/a (one seed)") for p, v, nf in
                  zip(part["p_holm"], part["verdict"], part.get("noise_floor", pd.Series(float("nan"), index=part.index)))],
            hovertemplate="%{y}: %{x:.4f}<br>%{text}<extra></extra>"))
    fig.add_vline(x=0, line_dash="dash", line_color="grey")
    unit = " mm" if metric.endswith("hd95") else ""
    fig.update_layout(xaxis_title=f"arm - baseline, mean {metric}{unit} with 95% CI", yaxis_title="arm and region",
                      height=200 + 40 * len(rows), legend_title_text="region")
    st.plotly_chart(fig, width="stretch")
    baseline = runs.set_index("run_id").get("params.baseline", pd.Series(dtype=object)).get(study_id)
    against = baseline if pd.notna(baseline) else "the baseline"
    if "noise_floor" in rows.columns:
        st.caption(f"Against {against}, runs as the unit: the paired run differences (same fold and seed) averaged over the "
                   "seeds of each fold, a t-test and its 95% CI over the folds, Holm-corrected across the regions of each metric. "
                   "Noise floor: the seed-to-seed SD of one run's mean (blank with one seed); spread: the SD over folds of the "
                   "paired differences, the noise the test reads; MDE: the smallest difference the verdict finds with 80% power "
                   "at that spread (Holm's first step). A difference below the noise floor is training noise. case_sd (HD95): "
                   "the SD its cases alone give a fold mean, which the test and MDE read where the spread is smaller (a near-tie "
                   "of HD95's penalties). family: Dice is primary (5% family-wise over its regions); the rest is secondary.")
        columns = ["arm", "metric", "folds", "seeds", "mean_baseline", "mean_arm", "mean_diff", "noise_floor",
                   *(["spread"] if "spread" in rows.columns else []), *(["case_sd"] if "case_sd" in rows.columns else []), "mde",
                   "ci_low", "ci_high", "p_value", "p_holm", "verdict", *(["family"] if "family" in rows.columns else [])]
    else:  # a study from before seeds: the per-case test it was reported with
        st.caption(f"Paired over the out-of-fold cases against {against}: bootstrap 95% CI of the mean difference; Wilcoxon "
                   "signed-rank p, Holm-corrected across the regions of each metric. (A study from before the run-level test: "
                   "it treats cases as independent and overstates the evidence.)")
        columns = ["arm", "metric", "n", "mean_baseline", "mean_arm", "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "verdict"]
    st.dataframe(rows[columns], hide_index=True, width="stretch")


def curves_section() -> None:
    st.subheader("Training curves")
    several = cells["seed"].nunique() > 1
    names = {f"{c.arm} fold {c.fold}" + (f" seed {c.seed}" if several else ""): i for i, c in enumerate(cells.itertuples())}
    col1, col2 = st.columns([3, 1])
    chosen = col1.multiselect("Folds", list(names), default=list(names))
    keys = review.curve_keys(runs, list(cells["run_id"]))
    if not keys:
        st.info("These runs logged no per-epoch metrics.")
        return
    key = col2.selectbox("Metric", keys)
    if not chosen:
        return
    curves = load_curves(uri, cells.iloc[[names[n] for n in chosen]], key)
    fig = px.line(curves.assign(fold=lambda d: "fold " + d["fold"].astype(str)), x="epoch", y="value",
                  color="arm", line_dash="fold", markers=True, color_discrete_sequence=px.colors.qualitative.D3)
    fig.update_layout(xaxis_title="epoch", yaxis_title=key, legend_title_text="arm, fold")
    st.plotly_chart(fig, width="stretch")


def cases_page() -> None:
    st.subheader("Cases, worst first")
    table = per_case
    seeds = sorted(per_case["seed"].unique()) if "seed" in per_case.columns else []
    if len(seeds) > 1:  # one seed at a time: a case is one prediction per arm
        seed = st.selectbox("Seed", seeds, format_func=lambda s: f"seed {s}")
        table = per_case[per_case["seed"] == seed]
    col1, col2, col3, col4, col5 = st.columns([2, 1, 1, 2, 1])
    arms = sorted(table["arm"].unique())
    arm = col1.selectbox("Arm", arms)
    region = col2.selectbox("Region", [r for r in REGIONS if f"dice_{r}" in table.columns])
    rank_by = col3.selectbox("Rank by", [m for m in (*review.ranking_metrics(table), "dice", "hd95") if f"{m}_{region}" in table.columns],
                             format_func=lambda m: METRIC_NAMES[m].split(" (")[0])
    folds = sorted(table["fold"].unique())
    shown_folds = col4.multiselect("Folds", folds, default=folds, format_func=lambda f: f"fold {f}")
    n = col5.number_input("How many", min_value=1, max_value=len(table), value=min(10, len(table)))
    chosen = table[table["fold"].isin(shown_folds)]
    worst = review.worst_cases(chosen, arm, region, int(n), by=rank_by)
    if worst.empty:
        st.info("No case matches these filters.")
        return
    st.caption("Choose a row to look at that case.")
    picked = st.dataframe(worst.drop(columns="run_id"), hide_index=True, width="stretch", on_select="rerun",
                          selection_mode="single-row", key=f"worst-{study_id}")
    rows = picked.selection.rows if picked is not None else []
    case = worst["case"].iloc[rows[0] if rows else 0]
    case_view(case, arm, table)


def case_view(case: str, arm: str, table: pd.DataFrame) -> None:
    mine = table[table["case"] == case].set_index("arm")
    st.subheader(f"{case} (fold {int(mine.loc[arm, 'fold'])})")
    others = [a for a in mine.index if a != arm]
    cards = st.columns(len(REGIONS))
    for region, card in zip(REGIONS, cards):
        for metric, unit in (("lesion_dice", ""), ("lesion_hd95", " mm"), ("dice", ""), ("hd95", " mm")):
            column = f"{metric}_{region}"
            if column not in mine.columns:
                continue
            value = mine.loc[arm, column]
            delta, changed = None, False
            if others:
                diff = value - mine.loc[others[0], column]
                changed = bool(pd.notna(diff) and round(diff, 3))  # NaN: a lesion-wise region absent from both maps
                delta = (f"{diff:+.3f}{unit} vs {others[0]}" if changed else f"same as {others[0]}" if pd.notna(diff)
                         else f"n/a vs {others[0]}")
            colour = "off" if not changed else "normal" if metric.endswith("dice") else "inverse"  # a smaller HD95 is better
            card.metric(f"{METRIC_NAMES[metric].split(' (')[0]} {region} ({arm})", f"{value:.3f}{unit}" if pd.notna(value) else "n/a",
                        delta=delta, delta_color=colour, delta_arrow="auto" if changed else "off")

    run_of = {a: mine.loc[a, "run_id"] for a in [arm, *others]}
    dataset = runs.set_index("run_id").get("params.data.dataset", pd.Series(dtype=object)).get(run_of[arm])
    volumes = load_case(uri, dataset if pd.notna(dataset) else None, case, tuple(run_of.items()))
    for note in volumes.notes:
        st.warning(note)
    if volumes.shape is None:
        st.info(f"Nothing to draw for {case}: neither its images nor a prediction could be read.")
        return

    col1, col2, col3 = st.columns([3, 4, 2])
    view = col1.radio("View", viz.VIEWS, horizontal=True, key="view")
    depth = viz.slice_count(volumes.shape, view)
    start = viz.tumour_slice(volumes.reference, volumes.convention, view)
    if start is None:
        start = viz.tumour_slice(volumes.predictions.get(arm), volumes.convention, view)
    index = col2.slider(f"{view} slice", 0, depth - 1, depth // 2 if start is None else start,
                        key=f"slice-{case}-{view}")
    opacity = col3.slider("Label opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")

    if volumes.images is not None:
        windows = [viz.window(volume) for volume in volumes.images]
        for col, name, volume, limits in zip(st.columns(4), MODALITIES, volumes.images, windows):
            col.image(viz.slice_rgb(viz.plane(volume, view, index), limits), caption=name, width="stretch")
        base, limits = viz.plane(volumes.images[MODALITIES.index("t1ce")], view, index), windows[MODALITIES.index("t1ce")]
    else:
        base, limits = None, (0.0, 1.0)
    panels = [("ground truth", volumes.reference)] + [(f"prediction: {a}", volumes.predictions.get(a)) for a in run_of]
    for col, (name, labels) in zip(st.columns(len(panels)), panels):
        if labels is None:
            col.caption(f"{name}: not available")
            continue
        cut = viz.plane(labels, view, index)
        gray = base if base is not None else cut * 0
        col.image(viz.slice_rgb(gray, limits, cut, volumes.convention, opacity), caption=f"{name} over t1ce",
                  width="stretch")
    st.caption(f"{view.capitalize()} slice {index} of {depth}. Colours as in the paper: ET red, NCR/NET green, "
               "ED yellow. Axial: anterior up, the patient's right on the left; coronal and sagittal: head up.")


if page == "Compare":
    compare_page()
elif page == "Cases":
    cases_page()
