//go:build race

package voice_test

// raceEnabled: the race detector makes sync.Pool drop items on purpose and allocates itself,
// so allocation counts mean nothing under it.
const raceEnabled = true
