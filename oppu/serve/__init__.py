"""Serving personal models over HTTP: `oppu serve`.

- `registry.py`: what a `model` name means (the base, a task-adapted base, `<run>/<user>`), found on disk;
- `cache.py`: served models as slots of one `MultiLora` (personal LoRA + its task LoRA in one slot), LRU;
- `scheduler.py`: continuous batching, a thread owning the model; rows join and leave between decode steps;
- `service.py`: the core without HTTP (model, registry, cache, scheduler, prompt encoding, `complete`);
- `auth.py`: API keys and which users' models each may use;
- `app.py`: the OpenAI-shaped FastAPI app (chat and text completions, models, server-sent events);
- `ray_app.py`: the same app as a Ray Serve application (`oppu serve --ray`), model replicas multiplexed by
  `model` so each keeps its routed users' adapters hot;
- `playground.py`: one input answered side by side by the base, RAG, OPPU and OPPU+RAG (the dashboard page).

Nothing is imported at package import: the CLI stays fast.
"""
