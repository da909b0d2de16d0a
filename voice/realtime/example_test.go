package realtime_test

import (
	"fmt"

	"github.com/coder/websocket"

	"voicegate/voice"
	"voicegate/voice/realtime"
)

// A session.update asking for G.711 µ-law becomes the voice bridge's config message.
func Example() {
	d := realtime.New()
	tr := d.Open(voice.DialectSession{SessionID: "S1", Audio: d.Audio(voice.AudioConfig{})})
	act := tr.Client(websocket.MessageText,
		[]byte(`{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcmu"}}}}}`), voice.Relayed{})
	fmt.Println(string(act.Control[0]))
	// Output: {"channels":1,"format":"mulaw","output_format":"pcm","output_sample_rate":24000,"sample_rate":8000,"type":"config"}
}
