"""The `qn` command line. Separate from qn_keras so the library never imports Beam or serving."""
