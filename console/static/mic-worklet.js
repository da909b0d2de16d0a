// The microphone's audio worklet: it takes the capture at the context's rate, averages it down
// to the session's rate (16 kHz unless told otherwise), and posts one frame of 16-bit
// little-endian PCM, mono, every frameMs (20 ms: 640 bytes at 16 kHz) to the page, which sends
// each as one binary WebSocket message. Averaging over each output sample's span of input is
// the low-pass that keeps the decimation from folding high frequencies into speech.
class PCM16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.rate = o.targetRate || 16000;
    this.step = sampleRate / this.rate; // input samples per output sample
    this.frame = new Int16Array(Math.round((this.rate * (o.frameMs || 20)) / 1000));
    this.filled = 0;
    this.pos = 0; // where the next output sample's span ends, in input samples from now
    this.sum = 0;
    this.count = 0;
    this.port.onmessage = (e) => {
      if (e.data === "stop") this.stopped = true;
    };
  }

  process(inputs) {
    if (this.stopped) return false;
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const ch = input[0];
    for (let i = 0; i < ch.length; i++) {
      this.sum += ch[i];
      this.count++;
      if (i + 1 >= this.pos) {
        this.push(this.sum / this.count);
        this.sum = 0;
        this.count = 0;
        this.pos += this.step;
      }
    }
    this.pos -= ch.length;
    return true;
  }

  push(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.filled === this.frame.length) {
      const out = new Int16Array(this.frame); // a copy: the buffer is transferred
      this.port.postMessage(out.buffer, [out.buffer]);
      this.filled = 0;
    }
  }
}

registerProcessor("pcm16-capture", PCM16Capture);
