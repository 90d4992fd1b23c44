from setuptools import find_packages, setup

setup(
    name='vap_jax',
    version='0.1.0',
    description='Video-As-Prompt (VAP) in JAX/Flax NNX: CogVideoX / Wan2.1 I2V DiTs with a '
                'Mixture-of-Transformers reference-video expert',
    python_requires='>=3.10',
    packages=find_packages(include=['vap_jax', 'vap_jax.*', 'convert', 'convert.*', 'configs',
                                    'configs.*']),
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'einops>=0.8.2',
        'ml_collections>=1.1.0',
        'av>=18.1.0',
        'safetensors>=0.8.0',
        'numpy>=2.0',
        'scipy',
        'ml_dtypes',
        'tqdm',
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
            'torch==2.13.0',
            'diffusers==0.42.1',
            'transformers==5.23.0',
            'accelerate==1.15.0',
            'sentencepiece',
            'psutil',
        ],
    },
    entry_points={
        'console_scripts': [
            'vap-convert=convert.pipeline:main',
            'vap-generate=vap_jax.pipelines.generate:main',
            'vap-convert-cogvideox=convert.cogvideox:main',
            'vap-convert-wan=convert.wan:main',
            'vap-convert-encoder=convert.encoders:main',
            'vap-convert-vae=convert.vae:main',
            'vap-precompute=convert.precompute:main',
        ],
    },
)
