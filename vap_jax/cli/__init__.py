"""Every console entry point: vap-convert(-*), vap-generate, vap-precompute.

Each module's ``main(argv) -> int`` returns the exit status: 0 done, 2 bad input (one line on
stderr naming the file or flag and what was expected).
"""
