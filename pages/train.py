"""Train page: a form that submits a training job, live progress of running jobs and sweeps, and the job history.

Training never runs inside this script: the form builds a RunConfig and hands it to `oppu.jobs`, which starts a
worker process; a fragment polls the job folders every two seconds. The details follow the job whose state
last changed (a cancel, a failure, a finish), so they never stay on an older job.
"""

from __future__ import annotations

import time

import streamlit as st

from dashboard import forms, jobs_view, state, widgets
from oppu import jobs
from oppu.config import METHODS, PEFT_KINDS, RETRIEVERS, ConfigError, method_label

label, default = forms.FIELDS, forms.default  # labels and RunConfig() defaults by the dotted key each field sets

st.title("Train personal adapters")
task = widgets.data_task_picker(key="train-task")
test_users: list[str] = []
with widgets.friendly(f"load the users of {task}"):
    test_users = [u.id for u in state.task_data(task).most_active(10_000)]

with st.form("train-form", border=True):
    st.markdown("**Users**: the N most active test users, or the ones you choose.")
    u1, u2 = st.columns([1, 3])
    n_users = u1.number_input(label["users"], value=default("users"), step=1, key="train-n")
    chosen = u2.multiselect(label["user_ids"], test_users, key="train-users")
    methods = st.multiselect(label["methods"], list(METHODS), default=default("methods"), format_func=method_label,
                             key="train-methods")
    c1, c2, c3 = st.columns(3)
    peft_kind = c1.selectbox(label["user_peft.kind"], PEFT_KINDS, index=PEFT_KINDS.index(default("user_peft.kind")),
                             key="train-peft")
    retriever = c2.selectbox(label["retrieval.retriever"], RETRIEVERS,
                             index=RETRIEVERS.index(default("retrieval.retriever")), key="train-retriever")
    k = c3.number_input(label["retrieval.k"], value=default("retrieval.k"), step=1, key="train-k")
    c4, c5, c6 = st.columns(3)
    epochs = c4.number_input(label["user_train.epochs"], value=default("user_train.epochs"), step=1,
                             key="train-epochs")
    lr = c5.number_input(label["user_train.lr"], value=default("user_train.lr"), step=1e-4, format="%.5f",
                         key="train-lr")
    rank = c6.number_input(label["user_peft.r"], value=default("user_peft.r"), step=1, key="train-rank",
                           help="LoRA alpha follows the rank (scaling 1, as the paper's r = alpha = 8)")
    m1, m2, m3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    model = m1.text_input(label["model.name"], value=state.default_model(), key="train-model",
                          help="`embedded:SmolLM2-135M-Instruct`, a Hugging Face id already in your cache, or a "
                               "local folder")
    adapt = m2.checkbox(label["task_adaptation"], value=default("task_adaptation"), key="train-adapt",
                        help="The paper's recipe: one LoRA on the other users' data, merged into the base before "
                             "the personal adapters (cached, so later jobs reuse it)")
    batched = m3.checkbox(label["batching"], value=default("batching") == "multi_lora", key="train-batched",
                          help="LoRA: train and answer several users in shared batches, each row through its own "
                               "user's adapter (multi-LoRA, the fast default); off: PEFT one user at a time, the "
                               "reference path (same recipe; the random initial draw and dropout masks differ)")
    seeds = st.text_input(forms.SEEDS_LABEL, value="", key="train-seeds", placeholder="e.g. 0,1,2",
                          help="Empty: one job. A comma list: one job per seed, grouped, so Overview, Compare and "
                               "`oppu results --group` show intervals over users and seeds. A seed sets the "
                               "adapters' initialisation, dropout, example order and sampling; the task-adapted "
                               "base is shared by every seed.")
    submitted = st.form_submit_button("Submit training job", type="primary", icon=":material/play_arrow:")

if submitted:
    try:
        configs = forms.train_configs(task, {
            "users": int(n_users), "user_ids": chosen or None, "methods": methods, "user_peft.kind": peft_kind,
            "retrieval.retriever": retriever, "retrieval.k": int(k), "user_train.epochs": int(epochs),
            "user_train.lr": float(lr), "user_peft.r": int(rank), "model.name": model, "task_adaptation": adapt,
            "batching": "multi_lora" if batched else "per_user"}, seeds)
    except ConfigError as exc:
        st.error(f"Not submitted: {exc}")
    else:
        with widgets.friendly("submit the job"):
            job_ids = [jobs.submit(cfg, str(state.paths().jobs)) for cfg in configs]
            if len(job_ids) == 1:
                note = f"Submitted job `{job_ids[0]}`: it appears below within two seconds."
            else:
                note = (f"Submitted {len(job_ids)} jobs, one per seed, in seed group `{configs[0].seed_group}`: "
                        f"{', '.join(f'`{j}`' for j in job_ids)}.")
            # shown by the job list only until the jobs are under way: no banner outlives its submission
            st.session_state["train-submitted"] = (job_ids, note, time.time())
            st.session_state["train-focus"] = job_ids[0]


@st.fragment(run_every=2)
def live_jobs() -> None:
    """Running jobs and the job history, refreshed every two seconds without rerunning the whole page."""
    with widgets.friendly("read the jobs"):
        job_list = jobs_view.list_jobs()
        jobs_view.submitted_banner(job_list)
        st.subheader("Running")
        sweeps = jobs.group_sweeps(job_list)
        for group in (g for g in sweeps if g["active"]):
            jobs_view.sweep_card(group)
        active = [j for j in job_list if j["state"] in jobs_view.ACTIVE_STATES]
        if not active:
            st.caption("No job is running.")
        for job in active:
            jobs_view.job_card(job)

        st.subheader("Job history")
        if not job_list:
            st.info("No jobs yet: submit one with the form above.")
            return
        if sweeps:
            st.markdown("**Sweeps**")
            st.dataframe(jobs_view.sweeps_frame(sweeps), hide_index=True, width="stretch")
        st.dataframe(jobs_view.jobs_frame(job_list), hide_index=True, width="stretch")
        jobs_view.focus_on_changes(job_list)
        labels = {j["id"]: f"{j['id']} · {j['state']}" + (f" · {jobs_view.member_label(j)}"
                                                         if j.get("sweep") else "") for j in job_list}
        job_id = st.selectbox("Details of job", list(labels), format_func=labels.get, key="train-detail")
        jobs_view.job_details(next(j for j in job_list if j["id"] == job_id))


live_jobs()
