"""n-gram language models for CTC decoding: built with KenLM (:mod:`qn_keras.lm.build`), kept
in LM folders (:mod:`qn_keras.lm.folder`), used in beam search (:mod:`qn_keras.lm.decoder`)
and tuned on a dev set (:mod:`qn_keras.lm.tune`). Imports no TensorFlow at module level."""
