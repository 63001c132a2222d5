"""Using a finished run: export its model, classify texts with it, generate with it.

``fedsb-dp export|predict|generate RUN`` and :meth:`fedsb_dp.Run.export`,
:meth:`fedsb_dp.Run.predict`, :meth:`fedsb_dp.Run.generate` all start from the run directory
(its final adapter, or the last completed round of an unfinished run) and never spend budget:
they read the released model only.
"""
