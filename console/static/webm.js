// Raw Opus packets out of MediaRecorder's "audio/webm;codecs=opus" stream: the gateway takes
// one raw packet per binary frame (format=opus), and MediaRecorder gives WebM (Matroska)
// bytes in whatever pieces it likes. This reads the EBML elements as they complete, steps into
// the Segment, its Clusters and BlockGroups (whose sizes MediaRecorder leaves unknown while it
// records), and hands out the frame of each SimpleBlock or Block of the audio track: one Opus
// packet each, as Matroska stores Opus. Everything else (the header, Tracks, Cues, timecodes)
// is skipped.

const SEGMENT = 0x18538067, CLUSTER = 0x1f43b675, BLOCK_GROUP = 0xa0;
const SIMPLE_BLOCK = 0xa3, BLOCK = 0xa1;
const MASTERS = new Set([SEGMENT, CLUSTER, BLOCK_GROUP]);

// vint reads an EBML variable-length integer at b[i]: its length and value (the marker bit
// kept for IDs, dropped for sizes), or null when b ends first. An unknown size is -1.
function vint(b, i, keepMarker) {
  if (i >= b.length) return null;
  const first = b[i];
  let len = 1;
  while (len <= 8 && !(first & (0x80 >> (len - 1)))) len++;
  if (len > 8) throw new Error("webm: bad variable-length integer");
  if (i + len > b.length) return null;
  let v = keepMarker ? first : first & (0xff >> len);
  let allOnes = v === 0xff >> len;
  for (let k = 1; k < len; k++) {
    v = v * 256 + b[i + k];
    if (b[i + k] !== 0xff) allOnes = false;
  }
  return { len, value: !keepMarker && allOnes ? -1 : v };
}

export class WebMOpus {
  constructor() {
    this.buf = new Uint8Array(0);
    this.track = -1; // the track of the first block: MediaRecorder records one
  }

  // push takes the next bytes of the recording and returns the Opus packets now complete.
  push(bytes) {
    const b = new Uint8Array(this.buf.length + bytes.length);
    b.set(this.buf);
    b.set(bytes, this.buf.length);
    const packets = [];
    let i = 0;
    for (;;) {
      const id = vint(b, i, true);
      if (!id) break;
      const size = vint(b, i + id.len, false);
      if (!size) break;
      const body = i + id.len + size.len;
      if (MASTERS.has(id.value)) {
        i = body; // step in: its children follow
        continue;
      }
      if (size.value < 0) throw new Error("webm: unknown size on a leaf element");
      if (body + size.value > b.length) break; // not complete yet
      if (id.value === SIMPLE_BLOCK || id.value === BLOCK) {
        const track = vint(b, body, false);
        const flags = b[body + track.len + 2];
        if (this.track < 0) this.track = track.value;
        if (track.value === this.track && (flags & 0x06) === 0) {
          // No lacing: the rest of the block is one frame.
          packets.push(b.slice(body + track.len + 3, body + size.value));
        }
      }
      i = body + size.value;
    }
    this.buf = b.slice(i);
    return packets;
  }
}
