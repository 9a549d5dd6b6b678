module arbiter.example/go-worker

go 1.19
