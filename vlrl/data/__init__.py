"""Where prompts come from: data files and Hugging Face datasets (files.py), the built-in synthetic tasks
(builtin.py; the video task motion.py; the zoom and calculator tasks live with their environments in
vlrl/envs/), the choice between them (sources.py), a sample made a chat prompt (encode.py) and the order a run
visits them in (stream.py). The record they produce, `Sample`, is in vlrl/sample.py, below data, rewards and
environments alike."""
