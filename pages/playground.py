"""Playground page: pick a run and one of its users, type an input or pick one of the user's queries, and see
side by side what the base (non-personalized), RAG, OPPU and OPPU+RAG answer, with the prompt each saw and the
retrieved items it used. The answers come from `oppu.serve.playground.compare` on the serving engine."""

from __future__ import annotations

import streamlit as st

from dashboard import state, widgets
from oppu.serve import playground

st.title("Playground")
where = state.paths()


@st.cache_resource(show_spinner="Loading the model…")
def service(artifacts: str, model: str):
    from oppu.serve.service import ServeConfig, Service

    return Service(ServeConfig(artifacts=artifacts, model=model))


with widgets.friendly(f"list the runs with adapters in {where.artifacts}"):
    found = playground.runs(where.artifacts)
if not found:
    st.info(f"No personal adapters in `{where.artifacts}` yet: train a run with the OPPU methods on **Train**, "
            "then come back to try it.")
    st.stop()

task = widgets.task_picker(sorted({r.task for r in found}), key="play-task")
runs = {r.run_id: r for r in found if r.task == task}
run_id, _ = widgets.pick("Run", list(runs), key="play-run", url_param="run")
user_id, _ = widgets.pick("User", list(runs[run_id].users), key="play-user", url_param="user")

with widgets.friendly(f"read the {task} data in {where.data}"):
    data = state.task_data(task)
    user = data.user(user_id)
queries = {q.id: q for q in user.queries}
source = st.radio("Input", ["One of the user's queries", "My own input"], horizontal=True, key="play-source",
                  disabled=not queries)
date = None
if queries and source == "One of the user's queries":
    qid = st.selectbox("Query", list(queries), key="play-query",
                       format_func=lambda q: f"{q} · {queries[q].input[:90]}")
    text, date = queries[qid].input, queries[qid].date
    st.caption(f"gold: `{queries[qid].gold}`" if queries[qid].gold else "no gold answer")
else:
    text = st.text_area("Task input", key="play-text", placeholder="e.g. Which tag does this movie relate to …")

if st.button("Answer side by side", type="primary", key="play-go", icon=":material/play_arrow:"):
    with widgets.friendly("answer"):
        answers = playground.compare(service(str(where.artifacts), state.default_model()), where.data, run_id,
                                     user_id, text, query_date=date, task_data=data)
        for column, a in zip(st.columns(len(answers)), answers, strict=True):
            with column:
                st.subheader(a.label)
                if a.model_id is None:
                    st.warning(a.note or "unavailable")
                    continue
                st.markdown(f"**{a.answer.strip() or '(empty answer)'}**")
                st.caption(f"model `{a.model_id}`")
                if a.retrieved:
                    with st.expander(f"{len(a.retrieved)} retrieved item(s)"):
                        for item in a.retrieved:
                            st.markdown(f"`{item.item_id}` · score {item.score:.2f}  \n{item.text}")
                st.caption(f"profile: {a.profile or 'none (these methods use no profile)'}")
                with st.expander("Prompt"):
                    st.code(a.prompt, language=None, wrap_lines=True)
