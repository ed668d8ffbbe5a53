"""The review dashboard: studies in the store, arms compared over folds, the worst cases.

Run it with `brats-lab dashboard` (or `streamlit run dashboard/app.py` from the project root). It
reads the store through `brats_lab.tracking` (mlruns/ here, or MLFLOW_TRACKING_URI) and never
writes to it.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from brats_lab import dashboard as db
from brats_lab import tracking
from brats_lab.labels import REGIONS

st.set_page_config(page_title="brats-lab review", layout="wide")
# The paper's colours, one per region, so a region looks the same on every chart.
REGION_COLOURS = {"ET": "#d62728", "TC": "#2ca02c", "WT": "#e6b800"}


@st.cache_data(ttl=10, show_spinner=False)
def load_runs(uri: str) -> pd.DataFrame:
    """All runs of the store (the uri keys the cache, so another store is read afresh)."""
    return tracking.read_runs()


@st.cache_data(ttl=10, show_spinner="Reading per-case metrics...")
def load_per_case(uri: str, cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    return db.load_per_case(cells)


@st.cache_data(ttl=10, show_spinner=False)
def load_comparison(uri: str, run_id: str) -> pd.DataFrame | None:
    return db.read_artifact_table(run_id, db.COMPARISON)


uri = tracking.tracking_uri()
st.sidebar.title("brats-lab review")
page = st.sidebar.radio("Page", ["Studies", "Compare", "Cases"])
st.sidebar.caption(f"store: `{uri}`")

if not db.store_exists():
    st.info(f"No runs yet: there is no store at `{uri}`. Train with `brats-lab train` or run an "
            "ablation with `brats-lab ablate attention`, then reload this page.")
    st.stop()

try:
    runs = load_runs(uri)
except Exception as e:  # a store that cannot be read: say so on the page, not as a traceback
    st.error(f"Cannot read the store `{uri}`: {e}")
    st.stop()

table = db.studies(runs)
if table.empty:
    st.info("The store has no ablation study and no training yet. Run `brats-lab ablate attention` "
            "or `brats-lab train --pipeline A`, then reload this page.")
    st.stop()

labels = {r.run_id: f"{r.name}  [{r.type}, {r.experiment}, {r.run_id[:8]}]" for r in table.itertuples()}
study_id = st.sidebar.selectbox("Study", list(labels), format_func=labels.get)
study = table.set_index("run_id").loc[study_id]

if page == "Studies":
    st.header("Studies")
    st.caption("Every ablation study and plain training in the store, newest first. Folds done counts "
               "finished (arm, fold) runs; choose one in the sidebar to compare its arms.")
    shown = table.assign(
        progress=[f"{d} / {int(p)}" if pd.notna(p) else f"{d}" for d, p in zip(table["folds_done"], table["folds_planned"])],
        wall_time=table["wall_time"].astype(str),
        started=table["started"].dt.strftime("%Y-%m-%d %H:%M UTC"),
    )
    st.dataframe(shown[["name", "type", "experiment", "state", "progress", "started", "wall_time", "run_id"]],
                 hide_index=True, use_container_width=True)
    st.stop()

# --- pages of one study --------------------------------------------------------------------------
cells = db.fold_runs(runs, study_id)
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

if page == "Compare":
    st.subheader("Dice per region, mean (std) over folds")
    st.dataframe(db.fold_table(per_case, "dice"), use_container_width=True)
    if any(f"hd95_{r}" in per_case.columns for r in REGIONS):
        st.subheader("HD95 (mm) per region, mean (std) over folds")
        st.dataframe(db.fold_table(per_case, "hd95"), use_container_width=True)

    st.subheader("Per-case Dice by arm and region")
    long = db.dice_long(per_case)
    fig = px.box(long, x="arm", y="dice", color="region", points="all", color_discrete_map=REGION_COLOURS,
                 hover_data=["case", "fold"], category_orders={"region": list(REGIONS)})
    fig.update_layout(yaxis_title="Dice (0-1, higher is better)", xaxis_title="arm", boxmode="group",
                      legend_title_text="region")
    fig.update_yaxes(range=[0, 1.02])
    st.plotly_chart(fig, use_container_width=True)
    st.caption("Each dot is one validation case of one fold; boxes span the quartiles over all folds' cases.")

    if study["type"] == "ablation":
        comparison = load_comparison(uri, study_id)
        st.subheader("Each arm against the baseline")
        if comparison is None:
            st.info("No comparison.csv on the study run yet: it is written when every fold has finished.")
        else:
            st.dataframe(comparison, hide_index=True, use_container_width=True)

elif page == "Cases":
    st.subheader("Worst cases")
    col1, col2, col3 = st.columns(3)
    arm = col1.selectbox("Arm", sorted(per_case["arm"].unique()))
    region = col2.selectbox("Region", [r for r in REGIONS if f"dice_{r}" in per_case.columns])
    n = col3.number_input("How many", min_value=1, max_value=100, value=10)
    worst = db.worst_cases(per_case, arm, region, int(n))
    st.dataframe(worst, hide_index=True, use_container_width=True)
    if not worst.empty:
        pick = st.selectbox("Case", list(worst.index), format_func=lambda i: f"{worst.at[i, 'case']} (fold {worst.at[i, 'fold']}, "
                            f"Dice {region} {worst.at[i, f'dice_{region}']:.3f})")
        row = worst.loc[pick]
        png = db.overlay_png(row["run_id"], row["case"])
        if png is None:
            st.info(f"No overlay picture of {row['case']}: the trainer draws only each fold's best and worst cases.")
        else:
            st.image(str(png), caption=f"{row['case']}, fold {row['fold']}: ground truth and prediction over T1ce")
