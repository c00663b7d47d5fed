# row_loop: standard 0.435 (-0.005), recycle 0.693 (+0.130) -> off
# recycle_draft: standard 0.435 (-0.005), recycle 0.547 (-0.016) -> on
# no_swiglu_epilogue: standard 0.447 (+0.007), recycle 0.583 (+0.020) -> off
export SET=''
FLAGS='--recycle-vocab draft'
