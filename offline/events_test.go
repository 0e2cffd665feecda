package offline

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestEventsStreamed: an events file is read as the packets' clock
// reaches its events, never more than ReorderWindow ahead, and in
// timestamp order although its lines are a little out of order; lines
// that are not events are counted.
func TestEventsStreamed(t *testing.T) {
	t0 := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	const n = 3 * ReorderWindow
	var b strings.Builder
	line := func(i int) {
		ts := t0.Add(time.Duration(i) * time.Millisecond).Format(time.RFC3339Nano)
		fmt.Fprintf(&b, `{"Event":0,"Timestamp":%q,"UUID":"host_1_%016X","ID":{"SPort":443,"DPort":%d,"SrcIP":"192.0.2.1","DstIP":"198.51.100.7","Interface":0,"Cookie":%d}}`+"\n", ts, i, 1024+i%60000, i)
	}
	for i := 0; i < n; i += 2 { // pairs swapped: out of order by one line
		line(i + 1)
		line(i)
		if i == 100 {
			b.WriteString("not an event\n")
		}
	}
	path := filepath.Join(t.TempDir(), "events.jsonl")
	os.WriteFile(path, []byte(b.String()), 0o644)
	s, err := openEvents(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	got, last := 0, t0.Add(-time.Second)
	for i := 0; i < n; i++ {
		until := t0.Add(time.Duration(i) * time.Millisecond).UnixNano()
		for e, ok := s.next(until, false); ok; e, ok = s.next(until, false) {
			if e.Timestamp.Before(last) || e.Timestamp.UnixNano() > until {
				t.Fatalf("event at %v after %v, clock %v", e.Timestamp, last, time.Unix(0, until))
			}
			last = e.Timestamp
			got++
		}
		if len(s.h) > ReorderWindow {
			t.Fatalf("%d events held", len(s.h))
		}
	}
	if got != n || s.bad != 1 {
		t.Errorf("%d events in order, %d bad lines; want %d and 1", got, s.bad, n)
	}
	locals, err := eventLocals(path, nil)
	if err != nil || len(locals) != 1 || locals[0].String() != "192.0.2.1" {
		t.Errorf("local addresses %v %v, want 192.0.2.1", locals, err)
	}
}
