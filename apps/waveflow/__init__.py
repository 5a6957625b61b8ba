"""WaveFlow (Ping et al. 2020): a flow-based vocoder, mel-spectrogram to waveform, trained by maximum likelihood."""
