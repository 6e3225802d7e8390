"""Train page: a form that submits a training job, live progress of running jobs, and the job history.

Training never runs inside this script: the form builds a RunConfig and hands it to `oppu.jobs`, which starts a
worker process; a fragment polls the job folders every two seconds.
"""

from __future__ import annotations

import streamlit as st

from dashboard import charts, widgets
from oppu.config import METHODS, PEFT_KINDS, RETRIEVERS, ConfigError

st.title("Train personal adapters")
task = widgets.data_task_picker(key="train-task")
test_users: list[str] = []
with widgets.friendly(f"load the users of {task}"):
    test_users = [u.id for u in widgets.task_data(task).most_active(10_000)]

with st.form("train-form", border=True):
    st.markdown("**Users**: the N most active test users, or the ones you choose.")
    u1, u2 = st.columns([1, 3])
    n_users = u1.number_input("N most active", value=2, step=1, key="train-n")
    chosen = u2.multiselect("…or these users (overrides N)", test_users, key="train-users")
    methods = st.multiselect("Methods", list(METHODS), default=["none", "rag", "oppu", "oppu+rag"],
                             format_func=charts.method_label, key="train-methods")
    c1, c2, c3 = st.columns(3)
    peft_kind = c1.selectbox("PEFT type", PEFT_KINDS, key="train-peft")
    retriever = c2.selectbox("Retriever", RETRIEVERS, key="train-retriever")
    k = c3.number_input("Retrieved items k", value=1, step=1, key="train-k")
    c4, c5, c6 = st.columns(3)
    epochs = c4.number_input("Epochs", value=2, step=1, key="train-epochs")
    lr = c5.number_input("Learning rate", value=1e-3, step=1e-4, format="%.5f", key="train-lr")
    rank = c6.number_input("LoRA rank", value=8, step=1, key="train-rank")
    m1, m2, m3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    model = m1.text_input("Base model", value=widgets.default_model(), key="train-model",
                          help="`embedded:SmolLM2-135M-Instruct`, a Hugging Face id already in your cache, or a "
                               "local folder")
    adapt = m2.checkbox("Task adaptation first", value=True, key="train-adapt",
                        help="The paper's recipe: one LoRA on the other users' data, merged into the base before "
                             "the personal adapters (cached, so later jobs reuse it)")
    batched = m3.checkbox("Users together", value=True, key="train-batched",
                          help="LoRA: train and answer several users in shared batches, each row through its own "
                               "user's adapter (multi-LoRA, the fast default); off: PEFT one user at a time, the "
                               "reference path (same recipe; the random initial draw and dropout masks differ)")
    submitted = st.form_submit_button("Submit training job", type="primary", icon=":material/play_arrow:")

if submitted:
    try:
        cfg = widgets.train_config(task=task, n_users=int(n_users), user_ids=chosen, methods=methods,
                                   peft_kind=peft_kind, rank=int(rank), retriever=retriever, k=int(k),
                                   epochs=int(epochs), lr=float(lr), model=model, task_adaptation=adapt,
                                   batching="multi_lora" if batched else "per_user")
    except ConfigError as exc:
        st.error(f"Not submitted: {exc}")
    else:
        with widgets.friendly("submit the job"):
            job_id = widgets.submit_job(cfg)
            st.success(f"Submitted job `{job_id}`: it appears below within two seconds.")


@st.fragment(run_every=2)
def live_jobs() -> None:
    """Running jobs and the job history, refreshed every two seconds without rerunning the whole page."""
    with widgets.friendly("read the jobs"):
        jobs = widgets.jobs()
        st.subheader("Running")
        active = [j for j in jobs if j["state"] in widgets.ACTIVE_STATES]
        if not active:
            st.caption("No job is running.")
        for job in active:
            widgets.job_card(job)

        st.subheader("Job history")
        if not jobs:
            st.info("No jobs yet: submit one with the form above.")
            return
        st.dataframe(widgets.jobs_frame(jobs), hide_index=True, width="stretch")
        job_id = st.selectbox("Details of job", [j["id"] for j in jobs], key="train-detail")
        widgets.job_details(next(j for j in jobs if j["id"] == job_id))


live_jobs()
