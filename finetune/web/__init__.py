"""The web app served by ``finetune serve`` at ``/``: server-rendered pages over the same registry, access rules
and services as the HTTP API; ``finetune.app.create_app`` includes :data:`finetune.web.app.router`.

Modules: ``app`` (the assembled router), ``core`` (rendering, the signed-in user, CSRF, error pages),
``session`` (the session store), ``signin``, ``pages`` (models, a model's tabs, versions), ``train`` (the Train
tab), ``compare`` (the Compare tab), ``live`` (a training's page), ``playground``, ``manage`` (a model's settings
and deletion, uploads), ``services`` (calls into the API's services), and what the pages show: ``views``,
``start_points`` (where a training starts and goes), ``charts``, ``preview``, ``markdown``, ``train_form``.
"""
