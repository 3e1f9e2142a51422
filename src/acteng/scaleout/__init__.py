"""Running acteng's loops on Ray: extraction on Ray Data, scoring on actors, serving on Serve.

Only imported when a Ray backend or ``acteng serve --replicas`` is asked for; Ray itself is
the optional extra ``acteng[ray]``. Workers get a model *recipe* (`acteng.ModelRecipe`),
never a model, and each loads the model once.
"""
