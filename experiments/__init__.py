"""rnnlab's experiments: importing this package registers every one of them.

    from experiments import registry
    registry.get("bilstm_mnist").run(config, workdir, mode="train")
"""

from experiments import mnist, registry
from experiments import char_lm, sine
from experiments import pixel_mnist
from experiments import bench
from experiments import synthetic_memory
