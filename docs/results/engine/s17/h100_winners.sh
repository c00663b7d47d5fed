# swiglu_epilogue: standard 0.448 (+0.000), recycle 0.570 (-0.014) -> on
# epilogue_down_w4: standard 0.438 (-0.009), recycle 0.562 (-0.022) -> on
# no_step_tables: standard 0.456 (+0.009), recycle 0.611 (+0.028) -> off
# no_module_last_only: standard 0.444 (-0.004), recycle 0.584 (+0.001) -> on
# recycle_draft: standard 0.444 (-0.004), recycle 0.568 (-0.015) -> on
export SET='triton_linear.SWIGLU_EPILOGUE=True triton_linear.SWIGLU_EPILOGUE=True triton_linear.SWIGLU_WARPS=4 engine.MODULE_LAST_ONLY=False'
FLAGS='--swiglu-epilogue --swiglu-epilogue --swiglu-warps 4 --no-module-last-only --recycle-vocab draft'
