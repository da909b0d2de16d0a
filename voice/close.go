package voice

import (
	"unicode/utf8"

	"github.com/coder/websocket"
)

// Close codes beyond RFC 6455's.
const (
	// CloseTokenInvalid ends a session whose token expired or was revoked.
	CloseTokenInvalid websocket.StatusCode = 4401
)

// maxCloseReason is the most a close reason may carry: a control frame's 125 bytes less the
// two of the code.
const maxCloseReason = 123

// clip keeps a close reason within the protocol's limit, cutting on a character boundary: a
// browser fails a close frame whose reason is not valid UTF-8 as 1006.
func clip(s string) string {
	if len(s) <= maxCloseReason {
		return s
	}
	s = s[:maxCloseReason]
	for len(s) > 0 {
		r, size := utf8.DecodeLastRuneInString(s)
		if r != utf8.RuneError || size > 1 {
			break
		}
		s = s[:len(s)-1] // a character cut in two, or not UTF-8 at all
	}
	return s
}

// upstreamClosed is how the session ends when the algorithm service closes it with ce. A
// normal close is passed on as one; 1012 (restarting) and 1013 (overloaded) reach the client
// as themselves, because they tell it what to do (reconnect, try again later); any other code
// means the service failed, and the client gets 1011.
func upstreamClosed(ce websocket.CloseError) ending {
	switch ce.Code {
	case websocket.StatusNormalClosure:
		return ending{code: websocket.StatusNormalClosure, reason: "the algorithm service ended the session"}
	case websocket.StatusServiceRestart:
		return ending{code: ce.Code, errCode: CodeAlgoService,
			reason: "the algorithm service is restarting; reconnect"}
	case websocket.StatusTryAgainLater:
		return ending{code: ce.Code, errCode: CodeAlgoService,
			reason: "the algorithm service is overloaded; try again later"}
	}
	return ending{code: websocket.StatusInternalError, errCode: CodeAlgoService,
		reason: "the algorithm service ended the session: " + ce.Reason}
}

// upCodeFor is the code the algorithm service gets when the gateway ends sessions with code:
// going away while the gateway restarts, a normal close otherwise.
func upCodeFor(code websocket.StatusCode) websocket.StatusCode {
	if code == websocket.StatusServiceRestart {
		return websocket.StatusGoingAway
	}
	return websocket.StatusNormalClosure
}
