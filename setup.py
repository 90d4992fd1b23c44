from setuptools import find_packages, setup

setup(
    name='vap_jax',
    version='0.1.0',
    description='Video-As-Prompt (VAP) in JAX/Flax NNX: CogVideoX / Wan2.1 I2V DiTs with a '
                'Mixture-of-Transformers reference-video expert',
    python_requires='>=3.10',
    # Only the library is installed: configs/ are files read by path, convert/ is documentation.
    packages=find_packages(include=['vap_jax', 'vap_jax.*']),
    # The trained VAP-Toy checkpoint and its example inputs (vap-toy demo; launch/train_toy.sh).
    package_data={'vap_jax.toy': ['checkpoint/*', 'checkpoint/**/*']},
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'ml_collections>=1.1.0',
        'av>=18.1.0',
        'safetensors>=0.8.0',
        'numpy>=2.0',
        'scipy',
        'ml_dtypes',
        'tqdm',
        'tensorboardX',
        # Text / image encoders: tokenizer files from checkpoints, Wan prompt cleaning, CLIP resize.
        'sentencepiece',
        'tokenizers',
        'ftfy',
        'pillow',
    ],
    extras_require={
        # PyTorch references for parity tests. torch is pinned exactly: that version resolves to a
        # CPU build here, a range would pull a multi-GB CUDA build.
        'test': [
            'pytest',
            'pytest-xdist',
            'torch==2.13.0',
            'diffusers==0.42.1',
            'transformers==5.23.0',
            'peft==0.21.2',
        ],
    },
    entry_points={
        'console_scripts': [
            'vap-convert=vap_jax.cli.convert:main',
            'vap-convert-cogvideox=vap_jax.cli.convert:cogvideox_main',
            'vap-convert-wan=vap_jax.cli.convert:wan_main',
            'vap-convert-encoder=vap_jax.cli.convert:encoder_main',
            'vap-convert-vae=vap_jax.cli.convert:vae_main',
            'vap-generate=vap_jax.cli.generate:main',
            'vap-precompute=vap_jax.cli.precompute:main',
            'vap-train=vap_jax.cli.train:main',
            'vap-export=vap_jax.cli.export:main',
            'vap-toy-data=vap_jax.data.toy:main',
            'vap-toy=vap_jax.cli.toy:main',
            'vap-eval=vap_jax.cli.eval:main',
        ],
    },
)
