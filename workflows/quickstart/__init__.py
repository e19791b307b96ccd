"""`bertflow quickstart`: the whole workflow on embedded defaults, offline, in minutes.

    run        the seven steps, one after the other (run_quickstart)
    data       the corpus and the generated sentiment task
    progress   a bar that follows a training run through its MLflow metrics
    summary    what was made, and where to look at it (render_summary)
"""
