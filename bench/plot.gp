# Renders bench/results/<name>.tsv (ratios to the physical limit) as a PNG.
# Usage: gnuplot -e "name='latest'" bench/plot.gp
set terminal pngcairo size 1100,520 font ",10"
set output sprintf("bench/results/%s.png", name)
set datafile separator "\t"
set title "Terna vs the physical limit of this disk (1.0 = as fast as the hardware allows)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set yrange [0:1.4]
set ylabel "ratio to physical limit (median of rounds)"
set grid ytics
set key outside right top vertical
set xtics rotate by -15
plot for [c=2:5] sprintf("bench/results/%s.tsv", name) using c:xtic(1) title columnheader(c)
