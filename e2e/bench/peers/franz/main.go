// Command kpipe-peer-franz is the franz-go peer of the kpipe side-by-side
// benchmark: a kgo consumer-group member that starts at the oldest offset,
// relies on franz-go's default autocommit and counts records in a PollFetches
// loop. It exits after -records records (committing and leaving the group)
// and prints one JSON line:
//
//	{"records":N,"bytes":B,"first_to_last_s":F,"wall_s":W}
//
// See ../README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// processStart is taken during package initialisation, i.e. as close to
// process start as Go code can get; it carries a monotonic clock reading.
var processStart = time.Now()

type options struct {
	brokers []string
	topic   string
	records int64
	group   string
	timeout time.Duration
}

type result struct {
	Records      int64   `json:"records"`
	Bytes        int64   `json:"bytes"`
	FirstToLastS float64 `json:"first_to_last_s"`
	WallS        float64 `json:"wall_s"`
}

func main() {
	opts, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kpipe-peer-franz:", err)
		os.Exit(1)
	}
	res, err := run(opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kpipe-peer-franz:", err)
		os.Exit(1)
	}
	line, _ := json.Marshal(res)
	fmt.Println(string(line))
}

func parseFlags() (options, error) {
	var o options
	// Bad flags are errors like any other: exit 1 (flag.ExitOnError would exit 2).
	flag.CommandLine.Init(os.Args[0], flag.ContinueOnError)
	brokers := flag.String("brokers", "localhost:9092", "comma-separated bootstrap brokers")
	flag.StringVar(&o.topic, "topic", "", "topic to consume")
	flag.Int64Var(&o.records, "records", 0, "exit once this many records have been consumed")
	flag.StringVar(&o.group, "group", "", "consumer group (default: a unique peers-franz-<pid>-<time> group)")
	flag.DurationVar(&o.timeout, "timeout", 300*time.Second, "fail if -records are not consumed within this time")
	if err := flag.CommandLine.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		return o, err
	}

	for _, b := range strings.Split(*brokers, ",") {
		if b = strings.TrimSpace(b); b != "" {
			o.brokers = append(o.brokers, b)
		}
	}
	if o.group == "" {
		o.group = fmt.Sprintf("peers-franz-%d-%d", os.Getpid(), time.Now().UnixNano())
	}
	switch {
	case flag.NArg() > 0:
		return o, fmt.Errorf("unexpected arguments: %q", flag.Args())
	case len(o.brokers) == 0:
		return o, errors.New("-brokers is empty")
	case o.topic == "":
		return o, errors.New("-topic is required")
	case o.records <= 0:
		return o, errors.New("-records must be > 0")
	case o.timeout <= 0:
		return o, errors.New("-timeout must be > 0")
	}
	return o, nil
}

func run(o options) (*result, error) {
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(o.brokers...),
		kgo.ClientID("kpipe-peer-franz"),
		kgo.ConsumerGroup(o.group),
		kgo.ConsumeTopics(o.topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	// Close leaves the group; with the default OnPartitionsRevoked it also
	// commits what has been polled. Bound it so a stuck broker cannot hang us.
	defer closeWithin(cl, 30*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()

	var (
		records, bytes int64
		first, end     time.Time
	)
loop:
	for {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, fmt.Errorf("timeout: %d of %d records consumed after %s", records, o.records, o.timeout)
		}
		if fetches.IsClientClosed() {
			return nil, errors.New("client closed while polling")
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			fmt.Fprintf(os.Stderr, "kpipe-peer-franz: fetch %s/%d: %v\n", topic, partition, err)
		})
		for it := fetches.RecordIter(); !it.Done(); {
			r := it.Next()
			if records == 0 {
				first = time.Now()
			}
			records++
			bytes += int64(len(r.Value))
			if records == o.records {
				end = time.Now()
				break loop
			}
		}
	}

	res := &result{
		Records:      records,
		Bytes:        bytes,
		FirstToLastS: end.Sub(first).Seconds(),
		WallS:        end.Sub(processStart).Seconds(),
	}

	// Commit what has been polled (autocommit would do so on its next tick or
	// on leave; do it explicitly so a commit failure is reported).
	cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer ccancel()
	if err := cl.CommitUncommittedOffsets(cctx); err != nil {
		return nil, fmt.Errorf("final commit for group %q: %w", o.group, err)
	}
	return res, nil
}

func closeWithin(cl *kgo.Client, limit time.Duration) {
	done := make(chan struct{})
	go func() {
		cl.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(limit):
		fmt.Fprintf(os.Stderr, "kpipe-peer-franz: close (leave group) did not finish within %s\n", limit)
	}
}
