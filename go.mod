module voicegate

go 1.26

require github.com/lmittmann/tint v1.2.1

require go.uber.org/goleak v1.3.0

require github.com/stretchr/testify v1.11.1 // indirect
